"""The batched image ops of the device pipeline, each with per-sample parameters, on CPU or
CUDA tensors (``[n, 3, H, W]`` floats in [0, 1] unless said otherwise); the view recipes that
compose them are in :mod:`pretrain.data.batched_views`.

* resized crop: PIL's antialiased bicubic resampling (the CPU path's ``Image.resize(BICUBIC)``:
  Keys a=-0.5, support scaled by the downscale factor, weights renormalised at the crop edge,
  the horizontal pass clipped to the pixel range before the vertical one) as two batched
  matmuls with per-sample weight matrices over images zero-padded to one size
  (:func:`pad_batch`; per size group, :func:`size_groups`, so an outsized image does not pad
  the whole batch to its size). On CIFAR crops (always upsampled) it matches PIL to about one
  uint8 level (mean 0.3), where ``roi_align`` (bilinear sampling; the first candidate) differed
  by 2 levels on average and up to 35. (Pillow 13 sometimes runs the vertical pass first; only
  where a pass overshoots the pixel range, as on full-range noise, does its clipping then
  differ, by up to ~20 levels at a few pixels.)
* brightness / contrast / saturation as one per-sample blend, hue, grayscale (0.2989, 0.587,
  0.114), Gaussian blur (separable grouped conv, reflect padding), solarize: torchvision's
  tensor semantics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# PIL solarizes uint8 pixels >= 128; a float x becomes uint8 round(255 x), which is >= 128
# exactly when x >= 127.5 / 255.
_SOLARIZE_THRESHOLD = 127.5 / 255


# ----------------------------------------------------------------------------- batches


def size_groups(shapes: Sequence[tuple[int, int]], slack: float = 1.5) -> list[list[int]]:
    """Image indices grouped so that padding a group to its largest height and width costs at
    most ``slack`` times the group's own pixels (one group, in batch order, when the whole batch
    meets that). Greedy over the images by area, largest first: one 4000x3000 photo among
    500x375 ones gets its own group instead of padding the whole batch to its size."""
    heights, widths = [h for h, _ in shapes], [w for _, w in shapes]
    if len(shapes) * max(heights) * max(widths) <= slack * sum(h * w for h, w in shapes):
        return [list(range(len(shapes)))]
    groups: list[list[int]] = []
    height = width = pixels = 0  # the open group's padded size and own pixels
    for i in sorted(range(len(shapes)), key=lambda i: -heights[i] * widths[i]):
        h, w = max(height, heights[i]), max(width, widths[i])
        area = heights[i] * widths[i]
        if groups and (len(groups[-1]) + 1) * h * w <= slack * (pixels + area):
            groups[-1].append(i)
            height, width, pixels = h, w, pixels + area
        else:
            groups.append([i])
            height, width, pixels = heights[i], widths[i], area
    return groups


def check_images(images: Sequence[Tensor]) -> None:
    """``ValueError`` unless ``images`` is B >= 1 tensors ``[3, H_i, W_i]``."""
    if not images or any(img.ndim != 3 or img.shape[0] != 3 for img in images):
        raise ValueError(
            f"expected B >= 1 images [3, H, W], got {[tuple(i.shape) for i in images]}"
        )


def pad_batch(images: Sequence[Tensor]) -> Tensor:
    """B ``[3, H_i, W_i]`` images -> ``[B, 3, max H, max W]`` zero-padded at the bottom/right,
    float16 on CUDA (exact for uint8 values), float32 elsewhere; one nested-tensor pad, not a
    copy per image."""
    check_images(images)
    dtype = torch.float16 if images[0].is_cuda else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
        nested = torch.nested.as_nested_tensor(list(images))
    return torch.nested.to_padded_tensor(nested.to(dtype), 0.0)


# ----------------------------------------------------------------------------- ops


def _bicubic(t: Tensor) -> Tensor:
    """PIL's bicubic filter (Keys, a = -0.5), support 2."""
    a, t = -0.5, t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def filter_taps(lengths: Tensor, size: int) -> int:
    """PIL's kernel size ``2 ceil(2 max(scale, 1)) + 1`` for the widest of the crop ``lengths``
    (host tensor) resampled to ``size``: the taps per output pixel."""
    return 2 * math.ceil(2.0 * max(1.0, float(lengths.max()) / size)) + 1


def resample_weights(
    start: Tensor,
    length: Tensor,
    size: int,
    extent: int,
    taps: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``[B, size, extent]`` rows of PIL's bicubic resampling of the input pixels
    ``[start, start + length)`` (per sample, ``start``/``length`` ``[B]``) to ``size`` outputs;
    zero outside the crop. Antialiased: the filter widens by the downscale factor. ``taps``:
    at least :func:`filter_taps` of ``length``. Computed as ``[B, size, taps]`` weights (float
    of ``start``) and scattered once into the ``dtype`` matrix, so the elementwise work does not
    grow with the (padded) image size."""
    scale = length / size  # [B] input pixels per output pixel
    stretch = scale.clamp(min=1.0)[:, None, None]  # [B, 1, 1] filter widening
    out = torch.arange(size, device=start.device, dtype=start.dtype)
    centre = ((out[None] + 0.5) * scale[:, None])[..., None]  # [B, size, 1] crop coordinates
    first = torch.floor(centre - 2.0 * stretch + 0.5)  # [B, size, 1] PIL's first tap
    x = first + torch.arange(taps, device=start.device, dtype=start.dtype)  # [B, size, taps]
    w = _bicubic((x + 0.5 - centre) * (1.0 / stretch))
    w = w * ((x >= 0) & (x < length[:, None, None]))  # PIL renormalises inside the crop
    w = (w / w.sum(-1, keepdim=True)).to(dtype or w.dtype)
    cols = (x + start[:, None, None]).long() + taps  # [B, size, taps], within [0, extent + 2 taps)
    dense = w.new_zeros(len(start), size, extent + 2 * taps).scatter_(2, cols, w)  # distinct cols
    return dense[..., taps : taps + extent]


def resized_crop(batch: Tensor, box: Tensor, host_box: Tensor, size: int, unit: float) -> Tensor:
    """Crop boxes ``box`` [B, 4] (top, left, height, width; ``host_box`` its CPU copy) of the
    padded ``batch`` [B, 3, H, W] (values in [0, unit]) resized to ``[B, 3, size, size]``
    float32 in [0, 1]."""
    b, c, h, w = batch.shape
    box = box.float()
    taps_x, taps_y = filter_taps(host_box[:, 3], size), filter_taps(host_box[:, 2], size)
    wx = resample_weights(box[:, 1], box[:, 3], size, w, taps_x, batch.dtype)  # [B, S, W]
    wy = resample_weights(box[:, 0], box[:, 2], size, h, taps_y, batch.dtype)  # [B, S, H]
    rows = batch.reshape(b, c * h, w) @ wx.transpose(1, 2)  # [B, 3H, S]: horizontal pass
    rows = rows.view(b, c, h, size).clamp(0, unit)  # PIL clips between the passes
    return ((wy[:, None] @ rows).float() / unit).clamp(0.0, 1.0)  # [B, 3, S, S]


def grayscale(x: Tensor) -> Tensor:
    """``[n, 3, H, W]`` -> ``[n, 1, H, W]`` luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend_op(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """torchvision's brightness (``op`` 0), contrast (1) or saturation (2) per sample:
    ``clamp(f x + (1 - f) d)`` with ``d`` = 0, the mean of the grayscale image, or the
    grayscale image. ``x`` [n, 3, H, W], ``op``/``factor`` [n]."""
    gray = grayscale(x)  # [n, 1, H, W]
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)  # [n, 1, 1, 1]
    op, f = op.view(-1, 1, 1, 1), factor.view(-1, 1, 1, 1)
    other = torch.where(op == 2, gray, torch.where(op == 1, mean, torch.zeros_like(mean)))
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's ``_rgb2hsv`` on ``[n, 3, H, W]``: h, s, v each ``[n, H, W]``."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    equal = maxc == minc  # grey pixels: s = h = 0, and no division by zero
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``[n, H, W]`` each -> ``[n, 3, H, W]``; the closed form of torchvision's six sectors:
    channel ``c = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``, n = 5, 3, 1."""
    h6 = h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` with a per-sample factor: ``x`` [n, 3, H, W], ``hue`` [n]."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + hue.view(-1, 1, 1), 1.0), s, v)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding) with a per-sample ``sigma`` [n], as a
    separable grouped convolution: ``x`` [n, C, H, W] -> same shape."""
    n, c, h, w = x.shape
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)  # [k]
    pdf = torch.exp(-0.5 * (t[None] / sigma.to(x.dtype)[:, None]).pow(2))  # [n, k]
    k1 = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n C, k]
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1.view(n * c, 1, 1, kernel), groups=n * c)  # [1, n C, H + 2 pad, W]
    y = F.conv2d(y, k1.view(n * c, 1, kernel, 1), groups=n * c)  # [1, n C, H, W]
    return y.view(n, c, h, w)


def solarize(x: Tensor) -> Tensor:
    """Invert the pixels at or above PIL's threshold 128 (see ``_SOLARIZE_THRESHOLD``)."""
    return torch.where(x >= _SOLARIZE_THRESHOLD, 1.0 - x, x)
