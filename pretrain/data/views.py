"""View recipes: the CPU augmentation pipelines that turn one PIL image into N tensors.

All transforms are torchvision v1 transforms, which draw their randomness only from torch's
global RNG. The stream (:mod:`pretrain.data.stream`) seeds that RNG per sample from
``(seed, epoch, index)`` right before calling the view maker, so a sample's views never depend on
which worker, rank or process produced it.

Recipes:

* :func:`two_view_transforms` with the default :class:`AugConfig` is the BYOL / SimCLR ImageNet
  recipe (224 px, blur ``[1.0, 0.1]``, solarize ``[0.0, 0.2]``).
* :meth:`AugConfig.simclr_cifar` is SimCLR's CIFAR variant (Chen et al. 2020, appendix B.9):
  32 px crops, colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, **no blur and no
  solarize** (``blur_prob = solarize_prob = [0, 0]``), CIFAR-10 mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass
class AugConfig:
    """The two-view (BYOL / SimCLR) augmentation recipe; embedded in the trainer config as
    ``data.aug``. ``blur_prob`` and ``solarize_prob`` hold one probability per view, so their
    length is the number of views."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1])
    solarize_prob: list[float] = field(default_factory=lambda: [0.0, 0.2])
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Multi-crop (DINO / SwAV; unused by two_view): the global crops take ``global_scale`` (and
    # the per-view blur / solarize lists above), plus ``local_crops`` crops of ``local_size`` px.
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_blur_prob: float = 0.5

    @classmethod
    def simclr_cifar(cls) -> AugConfig:
        """SimCLR's CIFAR-10 recipe: 32 px, jitter (0.4, 0.4, 0.4, 0.1), no blur, no solarize."""
        return cls(
            size=32,
            saturation=0.4,
            blur_prob=[0.0, 0.0],
            solarize_prob=[0.0, 0.0],
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
        )


def blur_kernel_size(size: int) -> int:
    """About 10% of the crop size, rounded to an odd number (at least 3): 224 -> 23, 32 -> 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _view_transform(cfg: AugConfig, blur_p: float, solarize_p: float) -> ImageTransform:
    ops: list[Callable] = [
        T.RandomResizedCrop(
            cfg.size, scale=tuple(cfg.scale), interpolation=InterpolationMode.BICUBIC
        ),
        T.RandomHorizontalFlip(p=cfg.flip_prob),
        T.RandomApply(
            [T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
            p=cfg.jitter_prob,
        ),
        T.RandomGrayscale(p=cfg.grayscale_prob),
    ]
    if blur_p > 0:
        blur = T.GaussianBlur(blur_kernel_size(cfg.size), sigma=(0.1, 2.0))
        ops.append(T.RandomApply([blur], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(ops)


def two_view_transforms(cfg: AugConfig) -> list[ImageTransform]:
    """One transform per view (``len(cfg.blur_prob)`` of them, normally 2).

    Each maps an RGB PIL image to a normalised float tensor ``[3, size, size]``: random resized
    crop (bicubic) -> flip -> colour jitter (p=jitter_prob) -> grayscale -> Gaussian blur
    (kernel ~10% of size, sigma in [0.1, 2]; left out when its probability is 0) -> solarize
    (threshold 128; left out when 0) -> ToTensor -> Normalize.
    """
    if len(cfg.blur_prob) != len(cfg.solarize_prob):
        raise ValueError(
            f"data.aug.blur_prob has {len(cfg.blur_prob)} entries but data.aug.solarize_prob has "
            f"{len(cfg.solarize_prob)}: both need one probability per view"
        )
    return [
        _view_transform(cfg, b, s) for b, s in zip(cfg.blur_prob, cfg.solarize_prob, strict=True)
    ]


def single_view_transform(cfg: AugConfig) -> ImageTransform:
    """MAE's one view: random resized crop (bicubic; ``cfg.scale``, (0.2, 1) in the paper) ->
    flip -> ToTensor -> Normalize. No colour augmentation."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                cfg.size, scale=tuple(cfg.scale), interpolation=InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(p=cfg.flip_prob),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def multi_crop_transforms(cfg: AugConfig) -> list[ImageTransform]:
    """Multi-crop (Caron et al. 2020 SwAV §3.2; DINO §3.1): global crops then local crops.

    ``len(cfg.blur_prob)`` global crops (2 in DINO / SwAV, whose methods take the first two
    views as the globals) of ``cfg.size`` px with scale ``cfg.global_scale`` and their per-view
    blur / solarize probabilities, then ``cfg.local_crops`` local crops of ``cfg.local_size`` px
    with scale ``cfg.local_scale``, blur ``cfg.local_blur_prob`` and no solarize. Every view
    index has a fixed size, so views stack into batches.
    """
    globals_ = two_view_transforms(replace(cfg, scale=cfg.global_scale))
    local_cfg = replace(cfg, size=cfg.local_size, scale=cfg.local_scale)
    local = _view_transform(local_cfg, cfg.local_blur_prob, 0.0)
    return globals_ + [local] * cfg.local_crops


def eval_transform(
    size: int,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageTransform:
    """Deterministic eval transform: PIL image -> ``[3, size, size]`` float tensor.

    ``Resize(resize)`` (bicubic, shorter side) + ``CenterCrop(size)``; with ``resize=None`` the
    shorter side is resized to ``size`` (a no-op for images already that size, e.g. 32 px CIFAR).
    """
    short_side = size if resize is None else resize
    return T.Compose(
        [
            T.Resize(short_side, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class ViewMaker:
    """Applies one transform per view to a PIL image; picklable, so DataLoader workers get it.

    ``ViewMaker(two_view_transforms(cfg))(img)`` -> list of ``[3, H, W]`` tensors, one per view.
    """

    def __init__(self, transforms: Sequence[ImageTransform]) -> None:
        if not transforms:
            raise ValueError("ViewMaker needs at least one view transform")
        self.transforms = list(transforms)

    @classmethod
    def two_view(cls, cfg: AugConfig) -> ViewMaker:
        """The view maker of :func:`two_view_transforms`."""
        return cls(two_view_transforms(cfg))

    @property
    def num_views(self) -> int:
        return len(self.transforms)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """``img`` (RGB PIL) -> ``num_views`` tensors ``[3, H, W]`` (float32, normalised)."""
        return [t(img) for t in self.transforms]


def view_maker(kind: str, aug: AugConfig) -> ViewMaker:
    """The view maker for the views a method declares (``Method.views``)."""
    if kind == "two_view":
        return ViewMaker.two_view(aug)
    if kind == "multi_crop":
        return ViewMaker(multi_crop_transforms(aug))
    if kind == "single":
        return ViewMaker([single_view_transform(aug)])
    raise ValueError(f"views {kind!r}: no view maker for it on the data side")
