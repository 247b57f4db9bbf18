"""The eval package's user-facing error (its own module so ``load`` and ``formats`` share it)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """A user-facing input problem (missing path, unlabelled data, unreadable or refused
    checkpoint); the CLI prints it on one line and exits 2."""
