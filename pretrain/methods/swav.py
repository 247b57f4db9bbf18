"""SwAV (Caron et al. 2020): swapped assignment prediction between multi-crop views.

backbone → projection MLP (2048 hidden, BN, ReLU, 128 out) → L2-normalise → prototypes
(``nmb_prototypes`` linear, no bias, rows re-normalised to unit length before every step). Codes
for the 2 global crops come from :func:`sinkhorn_knopp` over the global batch (no gradient);
every other crop predicts them (:func:`swav_loss`). Prototypes get no gradient for the first
``freeze_prototypes_steps``.

Queue (paper §4 / official code, for small batches): from ``queue_start_step`` on, a FIFO of
the last ``queue_length`` embeddings of each global crop over the global batch (a buffer, so it
survives resume); once full, their prototype scores are prepended to the batch's scores for
Sinkhorn only — they enlarge the equal-partition problem, never the loss. The official code
keeps ``queue_length / world_size`` rows per rank; here every rank holds the whole queue
(updated from the all-gathered embeddings) and scores its slice ``r`` of it, so the union over
ranks is exactly what one process with the whole batch keeps, and a checkpoint resumes on any
world size that divides ``queue_length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import Backbone
from pretrain.dist import rank, world_size
from pretrain.losses.dino import upcast
from pretrain.losses.gather import gather_no_grad
from pretrain.losses.swav import sinkhorn_knopp, swav_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.dino_head import multi_crop_features
from pretrain.modules.heads import mlp

N_GLOBAL = 2  # crops used for assignment: the views list is [global1, global2, locals...]


@dataclass
class SwAVConfig(MethodConfig):
    """Paper defaults (ResNet-50, ImageNet): 2048 → 128 projection, 3000 prototypes, τ = 0.1,
    ε = 0.05, 3 Sinkhorn iterations, prototypes frozen for 313 iterations; queue of 3840 from
    epoch 15 for batch 256 (no queue at batch 4096)."""

    name: str = "swav"
    hidden_dim: int = 2048
    dim: int = 128
    nmb_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 313
    queue_length: int = 0
    queue_start_step: int = 0

    def validate(self) -> None:
        for key in ("nmb_prototypes", "dim", "sinkhorn_iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "epsilon"):
            if getattr(self, key) <= 0:
                raise ValueError(f"method.{key}: must be > 0, got {getattr(self, key)}")
        if self.queue_length < 0:
            raise ValueError(f"method.queue_length: must be >= 0, got {self.queue_length}")


class SwAVStudent(nn.Module):
    """``views → (z [V*b, dim] unit rows, scores [V*b, K] = z · prototypesᵀ)``."""

    def __init__(self, backbone: Backbone, projector: nn.Module, prototypes: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.prototypes = prototypes

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projector(multi_crop_features(self.backbone, views)), dim=1, p=2)
        return z, self.prototypes(z)  # [V * b, dim], [V * b, K]


class SwAV(Method):
    views = "multi_crop"

    def __init__(self, cfg: SwAVConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(backbone.embed_dim, cfg.hidden_dim, cfg.dim, 2)
        prototypes = nn.Linear(cfg.dim, cfg.nmb_prototypes, bias=False)
        self.student = SwAVStudent(backbone, projector, prototypes)
        world = world_size()
        if cfg.queue_length % world:
            raise ValueError(
                f"method.queue_length: {cfg.queue_length} is not divisible by the world size "
                f"{world}"
            )
        # [crops for assignment, length, dim], the same on every rank; zeros = empty (the paper's)
        self.register_buffer("queue", torch.zeros(N_GLOBAL, cfg.queue_length, cfg.dim))

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        w = self.student.prototypes.weight  # [K, dim]
        w.copy_(F.normalize(w, dim=1, p=2))

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        self.normalize_prototypes_()
        z, scores = self.run_student(views)  # [V * b, dim], [V * b, K]
        b = views[0].shape[0]
        codes = [
            self.codes(i, z[i * b : (i + 1) * b], scores[i * b : (i + 1) * b], state)
            for i in range(N_GLOBAL)
        ]
        loss = swav_loss(list(scores.chunk(len(views))), codes, self.cfg.temperature)
        return LossOutput(loss, embeddings=z[:b].detach())

    @torch.no_grad()
    def codes(
        self, i: int, z: torch.Tensor, scores: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """Sinkhorn codes ``[b, K]`` of global crop ``i`` (queue scores prepended when full)."""
        out = scores.detach()  # [b, K]
        use_queue = self.queue.shape[1] > 0 and state.step >= self.cfg.queue_start_step
        if use_queue:
            queue = self.queue[i]  # [L, dim]
            if not torch.all(queue[-1] == 0):  # full
                mine = queue.chunk(world_size())[rank()]  # [L / world, dim]
                w = self.student.prototypes.weight
                with torch.autocast(queue.device.type, enabled=False):  # scores / ε: keep fp32
                    queue_scores = mine @ w.to(queue.dtype).t()  # [L / world, K]
                out = torch.cat([queue_scores, upcast(out)])  # [L / world + b, K]
            # newest first, oldest dropped: the paper's queue[b:] = queue[:-b]; queue[:b] = z
            z_all = gather_no_grad(z.to(queue.dtype))  # [B, dim], rank order
            queue.copy_(torch.cat([z_all, queue])[: queue.shape[0]])
        q = sinkhorn_knopp(out, self.cfg.epsilon, self.cfg.sinkhorn_iterations)
        return q[-scores.shape[0] :]  # [b, K]

    def on_after_backward(self, state: StepState) -> None:
        if state.step < self.cfg.freeze_prototypes_steps:
            for p in self.student.prototypes.parameters():
                p.grad = None

    def export_backbone(self) -> Backbone:
        return self.student.backbone
