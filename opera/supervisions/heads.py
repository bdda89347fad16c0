"""MLP heads in MoCo-v3's form: ``Linear(no bias) -> BN -> ReLU`` per hidden layer."""

from __future__ import annotations

from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """``num_layers`` linear layers; every layer but the last is followed by BN and ReLU.

    With ``last_bn`` the output goes through a BatchNorm without affine parameters (MoCo-v3's
    projector, as in SimCLR); the predictor and the class head have ``last_bn=False``.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
