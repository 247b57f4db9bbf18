"""Training and eval data: shard streams, view recipes, the resumable loader.

* :class:`TrainLoader`: infinite, exactly resumable two-view (or N-view) batches over shards.
* :func:`eval_loader`: every sample once, in index order, from shards or an image folder.
* :class:`AugConfig`, :func:`two_view_transforms`, :class:`ViewMaker`, :func:`eval_transform`.
"""

from pretrain.data.eval_data import EvalLoader, eval_loader
from pretrain.data.loader import TrainLoader
from pretrain.data.position import merge_states
from pretrain.data.stream import ShardStream, sample_seed
from pretrain.data.views import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    ViewMaker,
    eval_transform,
    two_view_transforms,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugConfig",
    "EvalLoader",
    "ShardStream",
    "TrainLoader",
    "ViewMaker",
    "eval_loader",
    "eval_transform",
    "merge_states",
    "sample_seed",
    "two_view_transforms",
]
