"""The input pipeline: where images are decoded and augmented (``data.pipeline``).

* ``workers`` (the CPU path, the default without CUDA): each loader worker decodes a sample with
  PIL and builds its views with torchvision (:mod:`pretrain.data.views`); the trainer copies the
  finished views to the device.
* ``device`` (the default on CUDA): workers only read the encoded bytes, parse the image size
  from the header and draw the sample's augmentation parameters (seeded per sample, exactly as
  the CPU path draws them: :func:`pretrain.data.batched_views.draw_params`); the trainer decodes
  the whole batch on the device (:mod:`pretrain.data.device_decode`) and applies the views as
  batched ops with per-sample parameters (:func:`pretrain.data.batched_views.apply_views`).
  It also runs on the CPU (tests), just slower than ``workers`` there. With
  ``data.decode=workers`` the workers decode too (libjpeg-turbo on the CPU) and the device only
  augments: for small images (CIFAR's 32x32), where a batched GPU decode costs the host more
  per image than a worker's CPU decode does, while the pixels travel as one flat uint8 buffer.

Both paths implement the same view recipes and draw identical parameters for a given (seed,
epoch, sample), so a resume is exact in either, and the data position is the loader's in both.
A sample whose bytes the device decoder cannot read (a corrupt JPEG body: the header was fine)
is replaced by another image of the batch, keeping the batch size, and counted as corrupt.

On CUDA the views of a batch (copies, decode, augmentation) are made on a side stream
(:mod:`pretrain.data.streams`): the trainer queues them while the previous step's kernels still
run, and there they run alongside those kernels rather than after them; the step waits for them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from pretrain.data.batched_views import ViewSpec, apply_views, draw_params, view_specs
from pretrain.data.device_decode import decode_batch, decode_on_cpu, split_encoded
from pretrain.data.streams import handed_over
from pretrain.data.views import AugConfig, ViewMaker, view_maker

log = logging.getLogger(__name__)


def resolve_pipeline(name: str, device: torch.device) -> str:
    """``auto`` -> ``device`` on CUDA, else ``workers``; other names unchanged."""
    if name not in ("auto", "workers", "device"):
        raise ValueError(f"data.pipeline: {name!r} is not auto, workers or device")
    if name == "auto":
        return "device" if device.type == "cuda" else "workers"
    return name


class EncodedViews:
    """The loader workers' side of the device pipeline (picklable): encoded bytes in, the bytes
    and their view parameters out; :meth:`collate` packs a batch's bytes into one buffer."""

    takes_bytes = True

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        self.specs = list(specs)

    def __call__(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bytes [n] uint8, params [V, P])``; the header is read, not the image (bad
        headers raise, and the stream counts the sample as corrupt)."""
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return encoded, draw_params(self.specs, height, width)

    @staticmethod
    def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``encoded [total]`` uint8 (all bytes, one buffer to pin and send), ``offsets [b + 1]``,
        ``params [b, V, P]``."""
        sizes = torch.tensor([0] + [e.numel() for e, _ in samples])
        return {
            "encoded": torch.cat([e for e, _ in samples]),
            "offsets": sizes.cumsum(0),
            "params": torch.stack([p for _, p in samples]),
        }


class DecodedViews(EncodedViews):
    """``data.decode=workers``: as :class:`EncodedViews`, but the worker decodes the image too
    (:func:`~pretrain.data.device_decode.decode_on_cpu`; undecodable bytes raise, and the
    stream counts the sample as corrupt) and ships its pixels."""

    def __call__(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixels [3, H, W] uint8, params [V, P])``."""
        image = decode_on_cpu(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return image, draw_params(self.specs, image.shape[1], image.shape[2])

    @staticmethod
    def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``pixels [sum 3 H_i W_i]`` uint8 (one buffer to pin and send), ``shapes [b, 2]``
        (H_i, W_i), ``params [b, V, P]``."""
        return {
            "pixels": torch.cat([image.reshape(-1) for image, _ in samples]),
            "shapes": torch.tensor([tuple(image.shape[1:]) for image, _ in samples]),
            "params": torch.stack([p for _, p in samples]),
        }


def split_pixels(pixels: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """The flat buffer of :meth:`DecodedViews.collate` back into B images ``[3, H_i, W_i]``
    (views of ``pixels``, on its device); ``shapes`` ``[B, 2]`` on the CPU."""
    hw = shapes.tolist()
    parts = pixels.split([3 * h * w for h, w in hw])
    return [part.view(3, h, w) for part, (h, w) in zip(parts, hw, strict=True)]


class InputPipeline:
    """Turns a loader batch into the views on the device: ``views(batch) -> [per view:
    [b, 3, H, W]]`` (float32, normalised; channels-last when asked)."""

    def __init__(
        self,
        kind: str,
        aug: AugConfig,
        name: str,
        device: torch.device,
        channels_last: bool,
        decode: str = "device",
    ) -> None:
        if decode not in ("device", "workers"):
            raise ValueError(f"data.decode: {decode!r} is not device or workers")
        self.name = resolve_pipeline(name, device)
        self.device, self.channels_last = device, channels_last
        self.specs = view_specs(kind, aug) if self.name == "device" else []
        self.worker_fn: ViewMaker | EncodedViews
        if self.name == "workers":
            self.worker_fn = view_maker(kind, aug)
        elif decode == "workers":
            self.worker_fn = DecodedViews(self.specs)
        else:
            self.worker_fn = EncodedViews(self.specs)
        self.corrupt_count = 0  # samples the device decoder could not read

    def views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's views on the device, ready for the current stream (made on a side
        stream on CUDA, see the module doc)."""
        if self.device.type != "cuda":
            return self.make_views(batch)
        return handed_over(lambda: self.make_views(batch), self.device, "views")

    def make_views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's views on the device, made on the current stream."""
        if self.name == "workers":
            views = [v.to(self.device, non_blocking=True) for v in batch["views"]]
        else:
            images = self.decode(batch)
            views = apply_views(images, batch["params"], self.specs)  # params stay on the CPU
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def decode(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Decoded RGB uint8 images on the device; unreadable ones replaced (see module doc)."""
        if "pixels" in batch:  # decoded by the workers
            return split_pixels(batch["pixels"].to(self.device, non_blocking=True), batch["shapes"])
        images = decode_batch(split_encoded(batch["encoded"], batch["offsets"]), self.device)
        good = next((im for im in images if im is not None), None)
        if good is None:
            raise RuntimeError("no image of the batch could be decoded")
        for i, image in enumerate(images):
            if image is None:
                log.warning("undecodable sample (epoch %d, index %d): replaced by another image "
                            "of its batch", int(batch["epoch"][i]), int(batch["index"][i]))  # fmt: skip
                images[i] = good
                self.corrupt_count += 1
        return images
