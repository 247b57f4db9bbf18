"""Detection transfer (``python -m eval detect``): torchvision Faster R-CNN on our backbones.

* ``data``: a COCO-format reader (images + ``instances_*.json``) giving torchvision targets.
* ``models``: ResNet -> ``BackboneWithFPN`` over layer1-4; ViT -> a simple feature pyramid
  (ViTDet); both feed the same ``FasterRCNN`` head (feature maps ``"0"``-``"3"`` + ``"pool"``).
* ``train``: SGD / AdamW with warmup + cosine for ``iters`` steps, then ``COCOeval`` (bbox).
* ``cli``: the ``detect`` subcommand's options and the per-init evaluation.
"""
