"""DINO (Caron et al. 2021): self-distillation with no labels, multi-crop.

Student and teacher are backbone + :class:`DINOHead`; the teacher is an EMA of the student
(cosine momentum ``momentum`` → 1) and sees only the 2 global crops, the student sees all crops
(one call, crops of equal size batched together). Loss: :func:`dino_loss` with the teacher's
outputs centered by an EMA ``center`` (a buffer: it survives resume) of their global-batch mean
and sharpened by a temperature warmed up linearly from ``warmup_teacher_temp`` to
``teacher_temp``. The last layer is frozen for ``freeze_last_layer_steps`` (paper: 1 epoch).
The weight-decay schedule (0.04 → 0.4) is ``optim.weight_decay_end`` and gradient clipping is
``engine.grad_clip`` (global norm here; the official code clips each parameter's norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.dino import dino_center_update, dino_loss, teacher_temperature
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.dino_head import DINOHead, multi_crop_features
from pretrain.modules.ema import ema_update_, make_teacher
from pretrain.schedules import cosine_momentum

N_GLOBAL = 2  # the views list is [global1, global2, local1, ..., localN]


@dataclass
class DINOConfig(MethodConfig):
    """Paper defaults (ViT-S/16): out_dim 65536, 3-layer head 2048 hidden, bottleneck 256, no BN
    in the head; τ_s 0.1, τ_t 0.04 → 0.07 over 30 epochs; center momentum 0.9; teacher momentum
    0.996 → 1 (cosine); last layer frozen during the first epoch."""

    name: str = "dino"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum: float = 0.996
    freeze_last_layer_steps: int = 0

    def validate(self) -> None:
        if self.out_dim < 1:
            raise ValueError(f"method.out_dim: must be >= 1, got {self.out_dim}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"method.momentum: must be in [0, 1], got {self.momentum}")
        if not 0 <= self.center_momentum < 1:
            raise ValueError(
                f"method.center_momentum: must be in [0, 1), got {self.center_momentum}"
            )
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"method.{key}: must be > 0, got {getattr(self, key)}")


class DINOStudent(nn.Module):
    """Backbone + head over a list of views (the official ``MultiCropWrapper``)."""

    def __init__(self, backbone: Backbone, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(multi_crop_features(self.backbone, views))  # [V * b, out_dim]


def disable_drop_path_(module: nn.Module) -> None:
    """The teacher is built without stochastic depth in the paper: zero every DropPath rate."""
    for m in module.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0


class DINO(Method):
    views = "multi_crop"

    def __init__(self, cfg: DINOConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        head = DINOHead(
            backbone.embed_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            cfg.use_bn_in_head,
            cfg.norm_last_layer,
        )
        self.student = DINOStudent(backbone, head)
        self.teacher = make_teacher(self.student)
        disable_drop_path_(self.teacher)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # [1, out_dim]

    def momentum(self, state: StepState) -> float:
        return cosine_momentum(state.step, state.total_steps, self.cfg.momentum)

    def teacher_temp(self, state: StepState) -> float:
        c = self.cfg
        return teacher_temperature(
            state.step, c.warmup_teacher_temp_steps, c.warmup_teacher_temp, c.teacher_temp
        )

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        student_out = self.run_student(views)  # [V * b, out_dim]
        with torch.no_grad():
            teacher_out = self.teacher(views[:N_GLOBAL])  # [2 * b, out_dim]
        temp = self.teacher_temp(state)
        c = self.cfg
        loss = dino_loss(student_out, teacher_out, self.center, len(views), c.student_temp, temp)
        # After the loss used the old center (the paper's order); a hidden all-reduce.
        self.center.copy_(dino_center_update(self.center, teacher_out, c.center_momentum))
        b = views[0].shape[0]
        return LossOutput(loss, {"teacher_temp": temp}, embeddings=student_out[:b].detach())

    def on_after_backward(self, state: StepState) -> None:
        if state.step < self.cfg.freeze_last_layer_steps:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def after_step(self, state: StepState) -> dict[str, float]:
        m = self.momentum(state)
        ema_update_(self.teacher, self.student, m)
        return {"momentum": m}

    def export_backbone(self) -> Backbone:
        return self.teacher.backbone
