"""View recipes: shapes, randomness from torch's global RNG only, the recipe's op lists."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pretrain.data import AugConfig, ViewMaker, eval_transform, two_view_transforms
from pretrain.data.views import blur_kernel_size
from tests.paths import CIFAR10

CIFAR_IMAGE = CIFAR10 / "train" / "cat"


@pytest.fixture(scope="module")
def image() -> Image.Image:
    if CIFAR_IMAGE.is_dir():
        return Image.open(sorted(CIFAR_IMAGE.glob("*.jpg"))[0]).convert("RGB")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def ops(transform: T.Compose) -> list:
    """The transform's ops, with RandomApply unwrapped to (op, p) pairs."""
    out = []
    for t in transform.transforms:
        out += [(inner, t.p) for inner in t.transforms] if isinstance(t, T.RandomApply) else [t]
    return out


def of_type(transform: T.Compose, cls: type) -> list:
    return [o for o in ops(transform) if isinstance(o[0] if isinstance(o, tuple) else o, cls)]


def test_cifar_views_shapes_and_dtype(image):
    views = ViewMaker.two_view(AugConfig.simclr_cifar())(image)
    assert len(views) == 2
    for v in views:
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert -3 < v.mean() < 3  # normalised, not [0, 255]


def test_imagenet_recipe_shape(image):
    views = ViewMaker.two_view(AugConfig(size=64))(image)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2


def test_two_views_differ_and_same_seed_repeats(image):
    maker = ViewMaker.two_view(AugConfig.simclr_cifar())
    torch.manual_seed(123)
    a = maker(image)
    torch.manual_seed(123)
    b = maker(image)
    torch.manual_seed(124)
    c = maker(image)
    assert not torch.equal(a[0], a[1])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_cifar_variant_has_no_blur_and_no_solarize():
    cfg = AugConfig.simclr_cifar()
    assert (cfg.size, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (
        32,
        0.4,
        0.4,
        0.4,
        0.1,
    )
    for t in two_view_transforms(cfg):
        assert not of_type(t, T.GaussianBlur) and not of_type(t, T.RandomSolarize)
        assert of_type(t, T.ColorJitter)[0][1] == 0.8


def test_default_recipe_blur_and_solarize_per_view():
    first, second = two_view_transforms(AugConfig())
    (blur1, p1), (_, p2) = of_type(first, T.GaussianBlur)[0], of_type(second, T.GaussianBlur)[0]
    assert (p1, p2) == (1.0, 0.1)
    assert blur1.kernel_size == (23, 23) and blur1.sigma == (0.1, 2.0)
    assert not of_type(first, T.RandomSolarize)
    assert of_type(second, T.RandomSolarize)[0].p == 0.2
    crop = ops(first)[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation.value == "bicubic"


def test_blur_kernel_is_odd_and_about_ten_percent():
    assert [blur_kernel_size(s) for s in (32, 96, 224, 256)] == [3, 9, 23, 25]


def test_mismatched_view_lists_are_rejected():
    with pytest.raises(ValueError, match="one probability per view"):
        two_view_transforms(AugConfig(blur_prob=[1.0], solarize_prob=[0.0, 0.2]))


def test_view_maker_is_picklable(image):
    maker = pickle.loads(pickle.dumps(ViewMaker.two_view(AugConfig.simclr_cifar())))
    assert maker.num_views == 2 and len(maker(image)) == 2


def test_eval_transform_is_deterministic_and_exact_at_native_size(image):
    t = eval_transform(32, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.equal(t(image), expected)  # 32 px input: no resampling at all
    big = eval_transform(24, resize=28)(image)
    assert big.shape == (3, 24, 24)
