"""BatchNorm over the global batch, on any backend.

``torch.nn.SyncBatchNorm`` only runs on accelerators. :class:`GlobalBatchNorm` computes the
batch mean and variance from sums all-reduced across ranks (differentiably), so the CPU/gloo
runs used in tests normalise exactly like one process holding the whole batch.
``convert_sync_batchnorm`` picks torch's fused version on CUDA and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses.gather import all_reduce_sum_with_grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d whose training statistics span all ranks.

    ``mean = Σ_r Σ x / N``, ``var = Σ_r Σ x² / N − mean²`` (biased, for normalising; computed
    on ``x`` shifted by the running mean for precision);
    running variance uses the unbiased ``var · N / (N − 1)`` as torch's BatchNorm does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D-5D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats):
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))  # reduce all but channels
        # Shift by the running mean (identical on every rank) so E[x²] − E[x]² does not cancel.
        shift = self._shift(x).view(shape)
        xs = x - shift
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        stats = all_reduce_sum_with_grad(torch.cat([xs.sum(dims), (xs * xs).sum(dims), count]))
        n = stats[-1]
        mean_shifted = stats[:c] / n  # [C]
        var = (stats[c : 2 * c] / n - mean_shifted * mean_shifted).clamp_min(0)  # [C], biased
        mean = mean_shifted + shift.view(c)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        y = (xs - mean_shifted.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None:
            return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        return self.running_mean.detach().to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * unbiased)


def _to_global(bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` with a cross-rank one (in place where possible)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        return _to_global(module)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
