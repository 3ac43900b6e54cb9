"""The HyperLDM noise predictor ε_η(x_t, t, c) (the authors' ``LatentDiffuser``)."""

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
    The condition is the question embedding; the null condition is the zero vector. By default (the
    authors') the embedding goes in raw. With ``standardize_condition`` it is standardised per dimension
    with statistics of the training questions (buffers, set by :meth:`set_condition_stats`) and the null
    condition is replaced by a learned embedding: sentence embeddings share a large common direction
    (on Meta-EasyVQA the mean has norm ~4 of ~6 and each dimension varies by ~0.2), which leaves the raw
    question almost constant next to x_t and makes the network slow to pick it up.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        cond_dim: int = 768,
        time_dim: int = 100,
        width: int = 128,
        depth: int = 2,
        standardize_condition: bool = False,
    ):
        super().__init__()
        self.time_dim = time_dim
        self.standardize_condition = standardize_condition
        if standardize_condition:
            self.register_buffer("cond_mean", torch.zeros(cond_dim))
            self.register_buffer("cond_std", torch.ones(cond_dim))
            self.null_cond = nn.Parameter(torch.zeros(cond_dim))
        layers: list[nn.Module] = []
        d = latent_dim + cond_dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, latent_dim))
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def set_condition_stats(self, questions: Tensor) -> None:
        """Per-dimension mean and std of the training questions ``[N, cond_dim]``."""
        if self.standardize_condition:
            self.cond_mean.copy_(questions.mean(0))
            self.cond_std.copy_(questions.std(0).clamp(min=1e-6))

    def condition(self, cond: Tensor) -> Tensor:
        if not self.standardize_condition:
            return cond
        null = (cond == 0).all(dim=-1, keepdim=True)
        return torch.where(null, self.null_cond.to(cond.dtype), (cond - self.cond_mean) / self.cond_std)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        emb = sinusoidal_embedding(t, self.time_dim).to(x.dtype)
        return self.net(torch.cat([x, self.condition(cond).to(x.dtype), emb], dim=-1))
