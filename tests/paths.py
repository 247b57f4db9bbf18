"""Where the tests find the real data: ``../shared/data`` beside the checkout, or the folder
named by ``SSLPIPE_DATA`` (e.g. a copy carried to a GPU machine, where ``../shared`` is not)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SSLPIPE_DATA") or REPO.parent / "shared" / "data")
CIFAR10 = DATA / "cifar10"
RACCOON = DATA / "detection" / "raccoon"
