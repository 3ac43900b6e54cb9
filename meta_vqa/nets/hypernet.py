"""Hypernetworks: MLPs that map a code (a latent, or a question embedding) to flat adapter weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from meta_vqa.nets.packed import linear


class MLP(nn.Module):
    """``in → hidden... → out`` MLP with the authors' init.

    Hidden layers: Kaiming-normal with the activation's gain; output layer: Kaiming-normal with
    linear gain (std = 1/sqrt(fan_in)); all biases zero. A wide output layer (a hypernetwork's, a VAE
    decoder's: ``out_dim`` adapter weights) is a :class:`~meta_vqa.nets.packed.PackedLinear`, whose CPU
    forward pass reads its weight prepacked; same parameters and state dict as ``nn.Linear``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu"):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-2], dims[1:-1]))
        self.layers.append(linear(dims[-2], dims[-1]))
        self.act = {"relu": nn.ReLU(), "softplus": nn.Softplus()}[activation]
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if last:
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[-1](self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """The input of the output layer: ``forward(x) = features(x) @ W_outᵀ + b_out``."""
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return x

    def fold_input(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The first layer after the affine map ``h ↦ h aᵀ + b`` (``a`` [in, r], ``b`` [in]) as one affine
        map ``h ↦ h mᵀ + c``: ``m = W_1 a`` [out_1, r], ``c = W_1 b + b_1``. The same function up to float
        reassociation; for a D-wide input (HyperCLIP's encoder reading a hypernetwork's weights) the
        D-wide product is done once instead of twice per call and row."""
        first = self.layers[0]
        return first.weight @ a, first.weight @ b + first.bias

    def from_first(self, pre: Tensor) -> Tensor:
        """``forward`` given the first layer's output ``pre`` (e.g. from :meth:`fold_input`)."""
        x = pre
        for layer in self.layers[1:]:
            x = layer(self.act(x))
        return x


class FiLMGenerator(nn.Module):
    """Shared adapter weights ``w0`` modulated per task by FiLM parameters predicted from the question.

    FiLM on the hidden pre-activation, ``γ1 ⊙ (x W1ᵀ/√d + b1) + β1``, equals an adapter with
    ``W1' = diag(γ1) W1`` and ``b1' = γ1 ⊙ b1 + β1`` (likewise ``γ2, β2`` on the residual branch's output),
    so the conditioned model is again a flat weight vector and shares every downstream code path.
    The predictor's last layer starts at zero: training starts from the unconditional model.
    """

    def __init__(self, adapter, cond_dim: int, hidden: Sequence[int] = (128,), init: Tensor | None = None):
        super().__init__()
        self.adapter = adapter
        self.w0 = nn.Parameter(init if init is not None else adapter.init_weights())
        h, d = adapter.hidden, adapter.dim
        self.film = MLP(cond_dim, hidden, 2 * (h + d))
        nn.init.zeros_(self.film.layers[-1].weight)
        self.sizes = [h, h, d, d]

    def forward(self, cond: Tensor) -> Tensor:
        g1, be1, g2, be2 = torch.split(self.film(cond), self.sizes, dim=-1)
        g1, g2 = 1.0 + g1, 1.0 + g2
        w1, w2, b1, b2 = self.adapter.split(self.w0)
        return self.adapter.flatten(
            g1.unsqueeze(-1) * w1, g2.unsqueeze(-1) * w2, g1 * b1 + be1, g2 * b2 + be2
        )
