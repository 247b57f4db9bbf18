"""Batched view augmentation with per-sample random parameters, on CPU or CUDA tensors.

The GPU data path: loader workers only read raw JPEG bytes and call :func:`draw_params` per
sample (torch's global RNG seeded per sample, as for the CPU path); the main process decodes
the batch on the device (``torchvision.io.decode_jpeg(list, device="cuda")``) and calls
:func:`apply_views`, which builds every view of the whole batch with batched kernels.

**Parameters.** :func:`draw_params` calls the same torchvision v1 ``get_params`` functions and
makes the same ``torch.rand`` draws as the CPU transforms of :mod:`pretrain.data.views`, in the
same order and under the same conditions (RandomApply draws before its transform, ColorJitter
draws only when applied, a blur / solarize with probability 0 is absent and draws nothing). So
after ``torch.manual_seed(s)`` it returns exactly the crop box, flip, jitter order and factors,
grayscale, blur sigma and solarize flags that the CPU path uses for that sample.

**Ops** (float images in [0, 1], one parameter row per sample; an op whose flag is 0 leaves the
sample unchanged, and an op no sample needs is skipped; the op decisions are read from a host
copy of the parameters, so apply_views never waits on the device):

* resized crop: PIL's antialiased bicubic resampling (the CPU path's ``Image.resize(BICUBIC)``:
  Keys a=-0.5, support scaled by the downscale factor, weights renormalised at the crop edge,
  the horizontal pass clipped to the pixel range before the vertical one) as two batched
  matmuls with per-sample weight matrices over the images zero-padded to one size (per size
  group: an outsized image does not pad the whole batch to its size). On CIFAR crops (always upsampled) it matches PIL to
  about one uint8 level (mean 0.3), where ``roi_align`` (bilinear sampling; the first
  candidate) differed by 2 levels on average and up to 35. (Pillow 13 sometimes runs the
  vertical pass first; only where a pass overshoots the pixel range, as on full-range noise,
  does its clipping then differ, by up to ~20 levels at a few pixels.)
* horizontal flip; colour jitter with per-sample factors and per-sample op order (4 stages; in
  each, brightness / contrast / saturation run as one blend and hue on its samples), with
  torchvision's tensor semantics; grayscale (0.2989, 0.587, 0.114); Gaussian blur (separable
  grouped conv, reflect padding); solarize; normalise.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import transforms as T

from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD, AugConfig, blur_kernel_size

PARAM_NAMES: tuple[str, ...] = (
    "top", "left", "height", "width",  # crop box in input pixels (RandomResizedCrop.get_params)
    "flip",  # 1: flipped horizontally
    "jitter",  # 1: colour jitter applied
    "order0", "order1", "order2", "order3",  # ColorJitter's randperm(4): the op run at stage k
    "brightness", "contrast", "saturation", "hue",  # jitter factors (1, 1, 1, 0 when unused)
    "gray",  # 1: converted to grayscale
    "blur", "sigma",  # 1: blurred, with this sigma
    "solarize",  # 1: solarized
)  # fmt: skip
_COL = {name: i for i, name in enumerate(PARAM_NAMES)}
_FACTORS = ("brightness", "contrast", "saturation", "hue")
_NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # the factor of each jitter op that leaves an image unchanged
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# PIL solarizes uint8 pixels >= 128; a float x becomes uint8 round(255 x), which is >= 128
# exactly when x >= 127.5 / 255.
_SOLARIZE_THRESHOLD = 127.5 / 255


@dataclass(frozen=True)
class ViewSpec:
    """One view of a recipe: what :func:`pretrain.data.views._view_transform` builds.

    ``colour=False`` is MAE's single view (resized crop + flip + normalise only).
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default
    flip_prob: float = 0.5
    colour: bool = True
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# ----------------------------------------------------------------------------- recipes


def _colour_spec(
    aug: AugConfig, size: int, scale: Sequence[float], blur_p: float, solarize_p: float
) -> ViewSpec:
    return ViewSpec(
        size=size,
        scale=(float(scale[0]), float(scale[1])),
        flip_prob=aug.flip_prob,
        jitter_prob=aug.jitter_prob,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=blur_p,
        blur_kernel=blur_kernel_size(size),
        solarize_prob=solarize_p,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
    )


def _two_view_specs(aug: AugConfig, scale: Sequence[float]) -> list[ViewSpec]:
    if len(aug.blur_prob) != len(aug.solarize_prob):
        raise ValueError(
            f"data.aug.blur_prob has {len(aug.blur_prob)} entries but data.aug.solarize_prob "
            f"has {len(aug.solarize_prob)}: both need one probability per view"
        )
    pairs = zip(aug.blur_prob, aug.solarize_prob, strict=True)
    return [_colour_spec(aug, aug.size, scale, b, s) for b, s in pairs]


def view_specs(kind: str, aug: AugConfig) -> list[ViewSpec]:
    """The views of ``views.view_maker(kind, aug)``, view for view.

    ``kind``: ``"two_view"`` (two_view_transforms), ``"multi_crop"`` (global crops then
    ``aug.local_crops`` local crops) or ``"single"`` (MAE: crop + flip + normalise).
    """
    if kind == "two_view":
        return _two_view_specs(aug, aug.scale)
    if kind == "multi_crop":
        local = _colour_spec(aug, aug.local_size, aug.local_scale, aug.local_blur_prob, 0.0)
        return _two_view_specs(aug, aug.global_scale) + [local] * aug.local_crops
    if kind == "single":
        scale = (float(aug.scale[0]), float(aug.scale[1]))
        mean, std = tuple(aug.mean), tuple(aug.std)
        return [
            ViewSpec(aug.size, scale, flip_prob=aug.flip_prob, colour=False, mean=mean, std=std)
        ]
    raise ValueError(f"views {kind!r}: no batched view recipe for it")


# ----------------------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=64)
def _jitter_ranges(b: float, c: float, s: float, h: float) -> tuple:
    """ColorJitter's checked ranges (None for an op that is off), as its forward passes them."""
    jitter = T.ColorJitter(b, c, s, h)
    return jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue


def _draw_colour(spec: ViewSpec, row: dict[str, float]) -> None:
    """The colour ops' draws, in the CPU transform's order (see ``views._view_transform``)."""
    if not spec.jitter_prob < torch.rand(1):  # RandomApply([ColorJitter], p)
        ranges = _jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        order, *factors = T.ColorJitter.get_params(*ranges)
        row["jitter"] = 1.0
        row.update({f"order{k}": float(op) for k, op in enumerate(order)})
        row.update({n: f for n, f in zip(_FACTORS, factors, strict=True) if f is not None})
    row["gray"] = float(torch.rand(1) < spec.grayscale_prob)  # RandomGrayscale
    if spec.blur_prob > 0 and not spec.blur_prob < torch.rand(1):  # RandomApply([blur], p)
        row["blur"], row["sigma"] = 1.0, T.GaussianBlur.get_params(*spec.blur_sigma)
    if spec.solarize_prob > 0:  # RandomSolarize
        row["solarize"] = float(torch.rand(1).item() < spec.solarize_prob)


def _draw_view(spec: ViewSpec, height: int, width: int) -> list[float]:
    row = dict.fromkeys(PARAM_NAMES, 0.0)
    row.update({f"order{k}": float(k) for k in range(4)})
    row.update(zip(_FACTORS, _NEUTRAL, strict=True))
    shape_only = torch.zeros(1, 1, 1).expand(3, height, width)  # get_params reads the shape
    box = T.RandomResizedCrop.get_params(shape_only, list(spec.scale), list(spec.ratio))
    row.update(zip(("top", "left", "height", "width"), map(float, box), strict=True))
    row["flip"] = float(torch.rand(1) < spec.flip_prob)  # RandomHorizontalFlip
    if spec.colour:
        _draw_colour(spec, row)
    return [row[name] for name in PARAM_NAMES]


def draw_params(specs: Sequence[ViewSpec], height: int, width: int) -> Tensor:
    """One sample's view parameters, ``[V, len(PARAM_NAMES)]`` float64, drawn from torch's
    global RNG view after view exactly as the CPU ``ViewMaker`` draws them for a
    ``height x width`` image (the caller seeds the RNG per sample)."""
    rows = [_draw_view(spec, height, width) for spec in specs]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(specs), len(PARAM_NAMES))


# ----------------------------------------------------------------------------- ops


def _subset(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(x, *args)`` on the samples where the host bool ``mask`` [B] is set; the others are
    unchanged. Nothing runs when no sample is selected, and no gather when all are."""
    if not bool(mask.any()):
        return x
    if bool(mask.all()):
        return fn(x, *args)
    idx = mask.nonzero().squeeze(1).to(x.device, non_blocking=True)  # [n]
    return x.index_copy(0, idx, fn(x[idx], *(a[idx] for a in args)))


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


# ----------------------------------------------------------------------------- views


def _colour_jitter(x: Tensor, host: Tensor, dev: Tensor) -> Tensor:
    """ColorJitter with per-sample factors and order: at stage k each jittered sample runs the
    op ``order_k`` (skipped when its factor is the neutral one, i.e. the op is off)."""
    first = _COL["brightness"]
    factors = dev[:, first : first + 4]  # [B, 4] (device)
    active = host[:, first : first + 4] != torch.tensor(_NEUTRAL, dtype=host.dtype)  # [B, 4]
    active &= host[:, _COL["jitter"], None] > 0
    for stage in range(4):
        col = _COL[f"order{stage}"]
        op_host, op = host[:, col].long(), dev[:, col].long()  # [B]
        runs = active.gather(1, op_host[:, None]).squeeze(1)  # [B]
        factor = factors.gather(1, op[:, None]).squeeze(1)  # [B]
        x = _subset(x, runs & (op_host < 3), blend_op, op, factor)
        x = _subset(x, runs & (op_host == 3), adjust_hue, factor)
    return x


def _finish_view(x: Tensor, host: Tensor, dev: Tensor, spec: ViewSpec) -> Tensor:
    """Everything after the resized crop: ``x`` [B, 3, S, S] in [0, 1], ``host``/``dev``
    [B, P] the view's parameter rows."""
    x = _subset(x, host[:, _COL["flip"]] > 0, lambda t: t.flip(-1))
    if spec.colour:
        x = _colour_jitter(x, host, dev)
        x = _subset(x, host[:, _COL["gray"]] > 0, lambda t: grayscale(t).expand_as(t))
        blur = functools.partial(gaussian_blur, kernel=spec.blur_kernel)
        x = _subset(x, host[:, _COL["blur"]] > 0, blur, dev[:, _COL["sigma"]])
        x = _subset(x, host[:, _COL["solarize"]] > 0, solarize)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


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


def resized_crops(
    images: Sequence[Tensor], host: Tensor, dev: Tensor, specs: Sequence[ViewSpec]
) -> list[Tensor]:
    """Per view, every image's resized crop ``[B, 3, S, S]`` (float32 in [0, 1], batch order);
    ``host``/``dev`` ``[B, V, P]``. The images are padded into one batch per size group
    (:func:`size_groups`), so an odd-sized image does not inflate the others' matmuls."""
    unit = 1.0 if images[0].is_floating_point() else 255.0
    groups = size_groups([(int(im.shape[1]), int(im.shape[2])) for im in images])
    crops: list[list[Tensor]] = [[] for _ in specs]
    for group in groups:
        batch = pad_batch([images[i] for i in group])  # [b, 3, H, W]
        rows = torch.tensor(group)
        on_dev = rows.to(dev.device, non_blocking=True)
        for v, spec in enumerate(specs):
            box, host_box = dev[on_dev, v, :4], host[rows, v, :4]
            crops[v].append(resized_crop(batch, box, host_box, spec.size, unit))
    if len(groups) == 1:
        return [c[0] for c in crops]
    order = torch.tensor([i for group in groups for i in group])
    inverse = torch.argsort(order).to(dev.device, non_blocking=True)  # batch order
    return [torch.cat(c)[inverse] for c in crops]


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


def apply_views(
    images: Sequence[Tensor], params: Tensor, specs: Sequence[ViewSpec]
) -> list[Tensor]:
    """Every view of a batch, each sample with its own parameters.

    ``images``: B decoded ``[3, H_i, W_i]`` tensors (uint8, or float in [0, 1]; sizes may
    differ) on one device; ``params`` ``[B, V, len(PARAM_NAMES)]`` (any device), row ``[i, v]``
    from :func:`draw_params` for image ``i``. Returns V float32 tensors ``[B, 3, S_v, S_v]``
    (normalised with the view's mean/std) on the images' device.
    """
    check_images(images)
    expected = (len(images), len(specs), len(PARAM_NAMES))
    if tuple(params.shape) != expected:
        raise ValueError(f"params has shape {tuple(params.shape)}, expected {expected}")
    host = params.detach().to("cpu", torch.float64)  # op decisions without device syncs
    dev = params.detach().to(images[0].device, torch.float32)
    crops = resized_crops(images, host, dev, specs)
    return [
        _finish_view(x, host[:, v], dev[:, v], spec)
        for v, (x, spec) in enumerate(zip(crops, specs, strict=True))
    ]
