"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved baselines with momentum contrastive
learning"), with MoCHi hard-negative mixing (Kalantidis et al. 2020) as options.

Query encoder: backbone + 2-layer MLP head (2048 hidden, 128 out, no BN). Key encoder: an EMA
of it (constant ``m = 0.999``). With ``q`` and ``k`` L2-normalised and a queue of ``K`` past keys::

    logits = [q · k+, q · queue_1, ..., q · queue_K] / T,      loss = CE(logits, label 0)

``T = 0.2``. After the loss, the keys of the *global* batch (gathered in rank order) are
enqueued on every rank, so all ranks hold one identical queue, equal to the queue of one process
holding the whole batch (the queue is a registered buffer: it survives resume).

BatchNorm: the paper shuffles the batch across GPUs before the key encoder ("shuffling BN") so
that per-GPU BN statistics cannot leak which key is the positive. Here the engine converts every
BN (query and key encoder) to a global-batch BN, whose statistics span the whole global batch,
which removes the per-GPU shortcut the shuffle was there to break; no shuffle is done.

MoCHi (§4 of Kalantidis et al.): per query, take the ``mochi_n`` hardest queue negatives
(highest ``q · n``); synthesise ``mochi_n1`` negatives ``α n_i + (1 − α) n_j`` (``α ~ U(0, 1)``)
and ``mochi_n2`` negatives ``β q + (1 − β) n_j`` (``β ~ U(0, 0.5)``), L2-normalise them and append
their logits (no gradient through them), from step ``mochi_start_step`` on. The random draws
come from a generator seeded with (``mochi_seed`` buffer, step), sliced per rank from the global
batch's draws: 2 processes × B/2 equal 1 × B, and a resumed run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import Backbone
from pretrain.dist import world_size
from pretrain.losses.gather import gather_no_grad, rank_offset
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.ema import ema_update_, make_teacher
from pretrain.modules.heads import mlp
from pretrain.modules.queue import KeyQueue


@dataclass
class MoCoV2Config(MethodConfig):
    """Paper defaults: T=0.2, m=0.999, K=65536, MLP 2048 → 128. MoCHi defaults of the paper's
    best ImageNet-1k setting: N=1024, s=1024 (``mochi_n1``), s'=256 (``mochi_n2``); 0 = off."""

    name: str = "mocov2"
    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 65536
    hidden_dim: int = 2048
    dim: int = 128
    symmetric: bool = False
    mochi_n: int = 1024
    mochi_n1: int = 0
    mochi_n2: int = 0
    mochi_start_step: int = 0

    def validate(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"method.queue_size: must be >= 1, got {self.queue_size}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"method.momentum: must be in [0, 1], got {self.momentum}")
        if (self.mochi_n1 or self.mochi_n2) and not 1 <= self.mochi_n <= self.queue_size:
            raise ValueError(
                f"method.mochi_n: must be in [1, queue_size={self.queue_size}], got {self.mochi_n}"
            )


def moco_queue_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo's logits ``[q·k+, q·queue (, q·extra)] / T``; the positive is column 0.

    Args:
        q: ``[b, D]`` queries (with gradient), unnormalised.
        k: ``[b, D]`` keys of the other view (no gradient), unnormalised.
        queue: ``[K, D]`` unit-norm negatives.
        extra_negatives: ``[b, S, D]`` unit-norm per-query negatives (MoCHi), or ``None``.

    Returns: ``[b, 1 + K (+ S)]``.
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # [b, 1]
    neg = q @ queue.T.to(q.dtype)  # [b, K]
    parts = [pos, neg]
    if extra_negatives is not None:
        parts.append(torch.einsum("bd,bsd->bs", q, extra_negatives.to(q.dtype)))  # [b, S]
    return torch.cat(parts, dim=1) / temperature


def moco_queue_loss(logits: torch.Tensor) -> torch.Tensor:
    """``CE(logits, 0)`` averaged over this rank's queries (DDP averages over ranks)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def mochi_negatives(
    q: torch.Tensor,
    queue: torch.Tensor,
    n_hard: int,
    n1: int,
    n2: int,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """MoCHi's synthetic hard negatives ``[b, n1 + n2, D]`` (unit norm, no gradient).

    ``q [b, D]`` (normalised here), ``queue [K, D]``. Random draws come from ``generator``
    (torch's global RNG when ``None``). ``rows = (offset, total)``: draw for ``total`` rows and
    use rows ``offset : offset + b``, so ranks holding slices of a global batch draw exactly what
    one process holding all of it would.
    """
    q = F.normalize(q.detach(), dim=1)
    queue = queue.to(q.dtype)
    hard_idx = (q @ queue.T).topk(min(n_hard, queue.shape[0]), dim=1).indices  # [b, N]
    hard = queue[hard_idx]  # [b, N, D]
    b, n, d = hard.shape
    offset, total = rows if rows is not None else (0, b)

    def uniform(count: int) -> torch.Tensor:  # [b, count] in [0, 1)
        u = torch.rand(total, count, generator=generator, device=q.device)
        return u[offset : offset + b].to(q.dtype)

    def pick(count: int) -> torch.Tensor:
        idx = (uniform(count) * n).long().clamp_max(n - 1)  # [b, count] uniform over N
        return torch.gather(hard, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # [b, count, D]

    out = []
    if n1 > 0:
        alpha = uniform(n1).unsqueeze(-1)  # [b, n1, 1] ~ U(0, 1)
        out.append(alpha * pick(n1) + (1 - alpha) * pick(n1))
    if n2 > 0:
        beta = 0.5 * uniform(n2).unsqueeze(-1)  # [b, n2, 1] ~ U(0, 0.5)
        out.append(beta * q.unsqueeze(1) + (1 - beta) * pick(n2))
    return F.normalize(torch.cat(out, dim=1), dim=2)  # [b, n1 + n2, D]


class MoCoV2Encoder(nn.Module):
    """Backbone + MLP head; one forward per view (BN statistics per view, as the paper)."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.head(self.backbone(v)) for v in views]  # V × [b, dim]


class MoCoV2(Method):
    views = "two_view"

    def __init__(self, cfg: MoCoV2Config, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        head = mlp(backbone.embed_dim, cfg.hidden_dim, cfg.dim, 2, hidden_bn=False)
        self.student = MoCoV2Encoder(backbone, head)
        self.teacher = make_teacher(self.student)
        self.queue = KeyQueue(cfg.queue_size, cfg.dim)
        self._pending_keys: torch.Tensor | None = None  # enqueued in after_step
        self.register_buffer("mochi_seed", torch.randint(0, 2**31, ()))

    def _mochi_generator(self, state: StepState, device: torch.device) -> torch.Generator:
        """MoCHi's draws: seeded from (``mochi_seed``, step), the same on every rank and after
        a resume (the buffer is in the checkpoint; torch's global RNG differs across ranks)."""
        g = torch.Generator(device=device)
        g.manual_seed(int(self.mochi_seed) * 1_000_003 + state.step)
        return g

    def _loss(self, q: torch.Tensor, k: torch.Tensor, state: StepState) -> torch.Tensor:
        c, extra = self.cfg, None
        if (c.mochi_n1 or c.mochi_n2) and state.step >= c.mochi_start_step:
            b = q.shape[0]
            rows = (rank_offset(b), b * world_size())
            g = self._mochi_generator(state, q.device)
            extra = mochi_negatives(q, self.queue.keys, c.mochi_n, c.mochi_n1, c.mochi_n2, g, rows)
        return moco_queue_loss(moco_queue_logits(q, k, self.queue.keys, c.temperature, extra))

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        used = views[:2] if self.cfg.symmetric else views[:1]
        qs = self.run_student(used)
        with torch.no_grad():
            key_views = [views[1], views[0]] if self.cfg.symmetric else [views[1]]
            ks = self.teacher(key_views)
        losses = [self._loss(q, k, state) for q, k in zip(qs, ks, strict=True)]
        loss = sum(losses) / len(losses)
        # The queue is read by the logits above; it changes only in after_step (no in-place
        # write into a tensor autograd saved). Gathered now: the global batch, in rank order.
        keys = [gather_no_grad(F.normalize(k.detach(), dim=1)) for k in ks]  # V × [B, dim]
        self._pending_keys = torch.cat(keys)
        return LossOutput(loss, embeddings=qs[0].detach())

    def after_step(self, state: StepState) -> dict[str, float]:
        ema_update_(self.teacher, self.student, self.cfg.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(self._pending_keys)
            self._pending_keys = None
        return {}

    def export_backbone(self) -> Backbone:
        """The query encoder's backbone, as the paper's linear evaluation uses (encoder_q)."""
        return self.student.backbone
