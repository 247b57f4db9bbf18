"""ImageNet-sized JPEGs for the GPU data-path benchmark, made from a small labelled folder.

The lent GPU machine has no ImageNet and only 64 MiB travel with a command, so the bench's real
input is made there: each CIFAR-10 image (1 KB) is upscaled (bicubic) to about the ImageNet
median size (``--width`` x ``--height``, 500 x 375 by default) and saved as a quality-90 JPEG
(about 60-90 KB: ImageNet's decode cost), class folders kept. Then ``python -m data_prep write``
makes shards of it. Usage::

    python scripts/make_bench_images.py SRC_FOLDER OUT_FOLDER [--per-class N] [--width W]
        [--height H] [--quality Q] [--workers N]
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image

log = logging.getLogger("make_bench_images")


def upscale_class(
    class_dir: Path, out: Path, per_class: int, size: tuple[int, int], quality: int
) -> int:
    """Write the first ``per_class`` images of ``class_dir``, upscaled to ``size`` (width,
    height), as JPEGs under ``out / class_dir.name``; returns the number written."""
    (out / class_dir.name).mkdir(parents=True, exist_ok=True)
    paths = sorted(class_dir.iterdir())[:per_class]
    for path in paths:
        with Image.open(path) as img:
            big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        big.save(out / class_dir.name / f"{path.stem}.jpg", quality=quality)
    return len(paths)


def upscale_folder(
    src: Path, out: Path, per_class: int, size: tuple[int, int], quality: int, workers: int = 1
) -> int:
    """:func:`upscale_class` for every class folder of ``src``, ``workers`` classes at a time;
    returns the number of images written."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    one = partial(upscale_class, out=out, per_class=per_class, size=size, quality=quality)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        return sum(pool.map(one, classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="labelled image folder (one subfolder per class)")
    p.add_argument("out", type=Path, help="output image folder")
    p.add_argument("--per-class", type=int, default=500, help="images per class (500)")
    p.add_argument("--width", type=int, default=500, help="output width in px (500)")
    p.add_argument("--height", type=int, default=375, help="output height in px (375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (90)")
    p.add_argument("--workers", type=int, default=1, help="classes written in parallel (1)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = (args.width, args.height)
    n = upscale_folder(args.src, args.out, args.per_class, size, args.quality, args.workers)
    log.info("wrote %d images to %s", n, args.out)


if __name__ == "__main__":
    main()
