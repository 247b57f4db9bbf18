"""COCO-format detection data (images + an ``instances_*.json``) as torchvision targets.

Each item is ``(image, target)``: ``image`` a float ``[3, H, W]`` tensor in ``[0, 1]`` (the
model's ``GeneralizedRCNNTransform`` normalises and resizes it), ``target`` a dict with
``boxes`` ``[N, 4]`` float xyxy pixels, ``labels`` ``[N]`` int64 (contiguous ids, 1..K in
sorted category-id order; 0 is the background) and ``image_id`` (the COCO id). COCO boxes are
``[x, y, w, h]``; ``iscrowd`` annotations and boxes without area are left out of training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from eval.errors import EvalInputError


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


class CocoDetection(Dataset):
    """The images of a COCO ``instances`` JSON (sorted by id; the first ``max_images`` if set).

    ``images``: the image directory (default: ``images/`` next to the JSON). ``train=True``
    flips each image horizontally with probability 0.5 (torch's RNG: in loader workers, the
    per-worker seed the ``DataLoader`` derives from its generator).
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        images: str | os.PathLike | None = None,
        train: bool = False,
        max_images: int | None = None,
    ):
        path = Path(annotations)
        if not path.is_file():
            raise EvalInputError(f"COCO annotation file not found: {annotations}")
        coco = json.loads(path.read_text())
        self.root = Path(images) if images is not None else path.parent / "images"
        if not self.root.is_dir():
            raise EvalInputError(f"image directory not found: {self.root}")
        self.annotations = path
        self.category_ids = sorted(c["id"] for c in coco["categories"])
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}  # 0: background
        self.images = sorted(coco["images"], key=lambda im: im["id"])[:max_images]
        self.boxes: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in coco["annotations"]:
            if ann["image_id"] in self.boxes:
                self.boxes[ann["image_id"]].append(ann)
        self.train = train

    @property
    def num_classes(self) -> int:
        """Object classes plus the background."""
        return len(self.category_ids) + 1

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """The torchvision target of image ``index`` (before any flip)."""
        info = self.images[index]
        anns = [a for a in self.boxes[info["id"]] if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": xywh_to_xyxy(boxes), "labels": labels,
                "image_id": torch.tensor(info["id"])}  # fmt: skip

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        with Image.open(self.root / info["file_name"]) as img:
            image = pil_to_tensor(img.convert("RGB")).float().div_(255)  # [3, H, W]
        target = self.target(index)
        if self.train and torch.rand(()) < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    """Detection batches stay lists: images differ in size (the model batches them)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
