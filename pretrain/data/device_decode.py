"""Batched image decoding on the training device (the device pipeline's first step).

JPEGs of a batch are decoded together with ``torchvision.io.decode_jpeg(list, device=...)``
(nvJPEG on CUDA, libjpeg-turbo on the CPU). Anything else (PNG, WebP, ...) and any JPEG the
batched decoder rejects (CMYK on the GPU, a corrupt body) is decoded alone on the CPU, with
torchvision first and PIL as the last resort, then copied to the device. A sample nothing can
decode comes back as ``None``; the caller decides what to do with it.

**CUDA streams.** torchvision's CUDA decoder allocates its outputs on the caller's current
stream but writes them from its own stream (and nvJPEG's hardware engine does not wait for work
queued before it), without ordering either against the caller's stream (pytorch/vision#9606,
reproduced on H100s: 199 of 200 trials corrupted). Memory that a queued kernel still reads,
freed on the host a moment ago, can then be handed to the decoder and overwritten. So on CUDA
the batch is decoded with a stream of its own current (:mod:`pretrain.data.streams`): its
outputs come from that stream's pool of blocks, which only ever held decoded images, each
handed over to the calling stream (``record_stream``: its block returns to the pool only once
the caller's stream is past it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from data_prep.reader import decode_image as pil_decode
from pretrain.data.streams import handed_over

log = logging.getLogger(__name__)

JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


def split_encoded(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The flat byte buffer ``data [total]`` (uint8) cut at ``offsets [B + 1]`` into B views."""
    bounds = offsets.tolist()
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def is_jpeg(encoded: torch.Tensor) -> bool:
    """Whether ``encoded`` (uint8 ``[n]``) starts with the JPEG SOI marker."""
    return encoded.numel() >= 3 and tuple(encoded[:3].tolist()) == JPEG_MAGIC


def decode_batch(
    encoded: Sequence[torch.Tensor], device: torch.device
) -> list[torch.Tensor | None]:
    """``B`` encoded images (CPU uint8 ``[n_i]``) -> ``B`` RGB uint8 ``[3, H_i, W_i]`` on
    ``device`` (``None`` where nothing can decode the bytes), ready for use on the current
    stream (CUDA: decoded on a side stream, see the module doc)."""
    if device.type != "cuda":
        return _decode_all(encoded, device)
    return handed_over(lambda: _decode_all(encoded, device), device, "decode")


def _decode_all(encoded: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEGs in one batched call, the rest (and rejected JPEGs) one by one on the CPU."""
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if is_jpeg(e)]
    for i, image in zip(jpegs, _decode_jpegs([encoded[i] for i in jpegs], device), strict=True):
        images[i] = image
    for i, image in enumerate(images):
        if image is None:
            images[i] = _decode_one(encoded[i], device)
    return images


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched call; when it fails, one call per image to find the ones that fail."""
    if not encoded:
        return []
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as exc:
        log.debug("batched JPEG decode failed (%s); decoding one by one", exc)
    out: list[torch.Tensor | None] = []
    for e in encoded:
        try:
            out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def decode_on_cpu(encoded: torch.Tensor) -> torch.Tensor:
    """One image (uint8 ``[n]``) -> RGB uint8 ``[3, H, W]`` on the CPU: torchvision
    (libjpeg-turbo, libpng, ...), then PIL for what torchvision cannot read; PIL's error when
    nothing can decode the bytes."""
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError:
        pil = pil_decode(encoded.numpy().tobytes())
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """CPU decode of one image, moved to ``device`` (``None``: undecodable)."""
    try:
        image = decode_on_cpu(encoded)
    except Exception as exc:  # any PIL failure: the bytes are not an image
        log.debug("undecodable image (%s: %s)", type(exc).__name__, exc)
        return None
    return image.to(device, non_blocking=True)
