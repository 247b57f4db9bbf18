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

**Views** (one parameter row per sample; an op whose flag is 0 leaves the sample unchanged, and
an op no sample needs is skipped; the op decisions are read from a host copy of the
parameters, so apply_views never waits on the device): resized crop, horizontal flip, colour
jitter with per-sample factors and per-sample op order (4 stages; in each, brightness /
contrast / saturation run as one blend and hue on its samples), grayscale, Gaussian blur,
solarize, normalise; the ops themselves are in :mod:`pretrain.data.batched_ops`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import transforms as T

from pretrain.data.batched_ops import (
    adjust_hue,
    blend_op,
    check_images,
    gaussian_blur,
    grayscale,
    pad_batch,
    resized_crop,
    size_groups,
    solarize,
)
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


# ----------------------------------------------------------------------------- views


def _subset(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(x, *args)`` on the samples where the host bool ``mask`` [B] is set; the others are
    unchanged. Nothing runs when no sample is selected, and no gather when all are."""
    if not bool(mask.any()):
        return x
    if bool(mask.all()):
        return fn(x, *args)
    idx = mask.nonzero().squeeze(1).to(x.device, non_blocking=True)  # [n]
    return x.index_copy(0, idx, fn(x[idx], *(a[idx] for a in args)))


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
    return (x - _per_channel(spec.mean, x.device)) / _per_channel(spec.std, x.device)


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, float, float], device: torch.device) -> Tensor:
    """``values`` as a ``[1, 3, 1, 1]`` tensor on ``device``, made once (not a host-to-device
    copy per view and step)."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


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
        group_host, group_dev = _group_rows(host, dev, group, whole=len(groups) == 1)
        for v, spec in enumerate(specs):
            box, host_box = group_dev[:, v, :4], group_host[:, v, :4]
            crops[v].append(resized_crop(batch, box, host_box, spec.size, unit))
    if len(groups) == 1:
        return [c[0] for c in crops]
    order = torch.tensor([i for group in groups for i in group])
    inverse = torch.argsort(order).to(dev.device, non_blocking=True)  # batch order
    return [torch.cat(c)[inverse] for c in crops]


def _group_rows(host: Tensor, dev: Tensor, group: list[int], whole: bool) -> tuple[Tensor, Tensor]:
    """A size group's parameter rows ``[b, V, P]`` (host, device): the tensors themselves when
    the group is the whole batch in order, one gather each otherwise."""
    if whole:
        return host, dev
    rows = torch.tensor(group)
    return host[rows], dev[rows.to(dev.device, non_blocking=True)]


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
