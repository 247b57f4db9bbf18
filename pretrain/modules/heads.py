"""Projection and prediction heads shared by methods."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    hidden_bn: bool = True,
    last_bn: bool = False,
    bias: bool = True,
) -> nn.Sequential:
    """``num_layers`` Linear layers with BN + ReLU between them (``[B, in] -> [B, out]``).

    ``last_bn=True`` appends a BatchNorm without affine parameters after the last layer
    (MoCo v3's projector). With BN after a Linear, that Linear's bias is redundant, so
    ``bias`` only applies to layers not followed by BN.
    """
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        last = i == num_layers - 1
        bn_after = last_bn if last else hidden_bn
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias and not bn_after))
        if not last:
            if hidden_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)
