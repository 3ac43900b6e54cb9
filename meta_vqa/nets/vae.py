"""HVAE: a variational autoencoder over flat adapter weights (the paper's HVAE).

Encoder E_φ: D → 128 → 128 → 2·latent (μ, s) with log-variance = s − 1 (the authors'
offset); decoder G_ψ: latent → 128 → 128 → D. Both are the hypernetwork MLP with the authors' init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from meta_vqa.nets.hypernet import MLP

LOGVAR_OFFSET = 1.0


class WeightVAE(nn.Module):
    """VAE over weight vectors ``[B, D]``.

    Args:
        weight_dim: D, the size of a flat weight vector.
        latent_dim: size of the latent (128).
        hidden: hidden widths of the encoder; the decoder mirrors them.
    """

    def __init__(self, weight_dim: int, latent_dim: int = 128, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.weight_dim = weight_dim
        self.latent_dim = latent_dim
        self.encoder = MLP(weight_dim, list(hidden), 2 * latent_dim)
        self.decoder = MLP(latent_dim, list(reversed(hidden)), weight_dim)

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)`` of q(z | w), each ``[B, latent]``."""
        mu, s = self.encoder(w).chunk(2, dim=-1)
        return mu, s - LOGVAR_OFFSET

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @staticmethod
    def sample(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        """Reparameterised ``z = μ + exp(½ log σ²) ⊙ ε``."""
        eps = torch.randn_like(mu) if eps is None else eps
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, w: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, μ, log σ²)`` of a stochastic pass."""
        mu, logvar = self.encode(w)
        return self.decode(self.sample(mu, logvar, eps)), mu, logvar


def vae_loss(
    recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, reconstruction, β·KL)`` of the authors' HVAE, both terms divided by √D.

    L_rec = Σ_d mean_b (recon − w)²_{b,d} / √D;
    L_KL = β · mean_b [−½ Σ_j (1 + log σ² − μ² − σ²)_{b,j}] / √D.
    """
    # float32 under mixed precision: sums over D = 394,240 weights lose the loss in bf16
    recon, target, mu, logvar = (t.float() for t in (recon, target, mu, logvar))
    scale = math.sqrt(target.shape[-1])
    rec = (recon - target).pow(2).mean(0).sum() / scale
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean() * beta / scale
    return rec + kl, rec, kl
