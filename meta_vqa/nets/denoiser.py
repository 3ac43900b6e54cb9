"""The HyperLDM noise predictor ε_η(x_t, t, c) (SPEC §4.6, the authors' ``LatentDiffuser``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int = 100, max_period: float = 1e4) -> Tensor:
    """``[cos(t·f), sin(t·f)]`` with f_k = exp(−ln(max_period)·k/half), k = 0..half−1 (cos first, as the authors)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LatentDenoiser(nn.Module):
    """MLP on ``[x_t, c, emb(t)]``: (Linear, LayerNorm, ReLU) × depth, then Linear to the latent size.

    With latent 128, condition 768, time 100, width 128 and depth 2 it has the authors' 161,152 parameters.
    The condition is the raw question embedding; the null condition is the zero vector.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        cond_dim: int = 768,
        time_dim: int = 100,
        width: int = 128,
        depth: int = 2,
    ):
        super().__init__()
        self.time_dim = time_dim
        layers: list[nn.Module] = []
        d = latent_dim + cond_dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        emb = sinusoidal_embedding(t, self.time_dim).to(x.dtype)
        return self.net(torch.cat([x, cond.to(x.dtype), emb], dim=-1))
