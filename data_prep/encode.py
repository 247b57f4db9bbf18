"""Reading one source image for a shard: check it decodes, shrink it if asked, return bytes.

Runs in worker processes, so the entry point :func:`encode_task` takes and returns plain,
picklable values and never raises for a bad image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

SAVE_PARAMS: dict[str, dict] = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}
"""Extra ``Image.save`` arguments per format when an image is re-encoded."""

KEEP_INFO: dict[str, tuple[str, ...]] = {
    "JPEG": ("exif", "icc_profile"),
    "WEBP": ("exif", "icc_profile"),
    "PNG": ("exif", "icc_profile"),
}
"""Metadata carried over from the original image when re-encoding, per format."""

RESIZE_MODES = ("RGB", "RGBA", "L", "LA", "CMYK")


@dataclass(frozen=True)
class EncodedImage:
    """The bytes to store for one image, the tar member extension, and whether it was resized."""

    ext: str
    data: bytes
    resized: bool


def normalise_ext(ext: str) -> str:
    """Lowercase extension, with ``jpeg`` stored as ``jpg``."""
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


def load_image(file: str, ext: str, resize_max: int | None = None) -> EncodedImage:
    """Read ``file`` and decode it fully; raise on any unreadable or corrupt image.

    The original bytes are returned untouched unless ``resize_max`` is set and the longer side
    exceeds it; then the image is resized (aspect kept, LANCZOS) and re-encoded, in its own
    format when possible (JPEG/WebP at quality 95), else as PNG.
    """
    with open(file, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if resize_max is None or max(img.size) <= resize_max:
            return EncodedImage(ext=normalise_ext(ext), data=data, resized=False)
        fmt, info = img.format, dict(img.info)
        small = resize_to_max(img, resize_max)
    new_fmt, new_data = save_image(small, fmt, info)
    new_ext = normalise_ext(ext) if new_fmt == fmt else "png"
    return EncodedImage(ext=new_ext, data=new_data, resized=True)


def resize_to_max(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` scaled so its longer side is ``max_side`` pixels, keeping the aspect ratio."""
    if img.mode not in RESIZE_MODES:
        has_alpha = "A" in img.mode or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    width, height = img.size
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def save_params(fmt: str, info: dict) -> dict:
    """``Image.save`` keyword arguments for ``fmt``, keeping EXIF/ICC data where supported."""
    params = dict(SAVE_PARAMS.get(fmt, {}))
    params.update({k: info[k] for k in KEEP_INFO.get(fmt, ()) if info.get(k)})
    return params


def save_image(img: Image.Image, fmt: str | None, info: dict) -> tuple[str, bytes]:
    """Encode ``img`` as ``fmt`` (as RGB if its mode does not fit), falling back to PNG."""
    attempts = [(fmt, img, save_params(fmt, info))] if fmt else []
    if fmt and img.mode != "RGB":
        attempts.append((fmt, img.convert("RGB"), SAVE_PARAMS.get(fmt, {})))
    attempts.append(("PNG", img, {}))
    error: Exception | None = None
    for attempt_fmt, attempt_img, params in attempts:
        buf = io.BytesIO()
        try:
            attempt_img.save(buf, format=attempt_fmt, **params)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            error = exc
            continue
        return attempt_fmt, buf.getvalue()
    raise OSError(f"cannot re-encode image: {error}")


def encode_task(task: tuple[str, str], resize_max: int | None = None) -> tuple:
    """Worker entry point: ``(file, ext) -> ("ok", ext, bytes)`` or ``("error", message)``."""
    file, ext = task
    try:
        image = load_image(file, ext, resize_max)
    except Exception as exc:  # any decoder failure means "skip this file", never a crash
        return ("error", f"{type(exc).__name__}: {exc}")
    return ("ok", image.ext, image.data)
