"""Guidance for the reverse process: classifier-free (CFG), classifier (HyperCLIP), and both together.

* CFG (the paper's HyperLDM sampling): ε̂ = (1 − γ)·ε(x, t, ∅) + γ·ε(x, t, c). γ = 0 is the unconditional model and γ = 1
  the conditional one; those two cases run a single forward pass, so they equal the plain samples exactly.
* Classifier guidance in score form (Dhariwal & Nichol 2021, "condition_score"):
  ε̂ ← ε̂ − s·√(1 − ᾱ_t)·∇_{x_t} log p(c | x_t). Our "classifier" is HyperCLIP's cosine between the
  weights decoded from the latent and the question embedding. It was trained on clean latents, so it is
  evaluated at the current estimate x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t. Differentiating through x̂_0(x_t)
  would multiply the gradient by 1/√ᾱ_t (≈ 650 at t = T−1 of the cosine schedule), so we take the
  gradient g = ∇_{x̂_0} log p(c | x̂_0) and set ε̂ ← ε̂ − s·√(ᾱ_t/(1−ᾱ_t))·g, which moves x̂_0 by exactly
  s·g at every step: one scale that means the same thing at every noise level.
* Combined guidance: CFG, then the classifier term on top, each with its own scale. Scale 0 for the
  classifier skips it, so combined guidance with s = 0 is plain CFG exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t [B], cond [B, c]) -> eps
Score = Callable[[Tensor], Tensor]  # x0 estimate [B, d] -> per-sample log-score [B]


def cfg_eps(model: Denoiser, x: Tensor, t: Tensor, cond: Tensor, gamma: float) -> Tensor:
    """Classifier-free guided noise prediction; the null condition is the zero vector. In float32 under
    mixed precision (the extrapolation γ > 1 amplifies the difference of two half-precision outputs)."""
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    if gamma == 0:
        return model(x, tt, torch.zeros_like(cond)).float()
    if gamma == 1:
        return model(x, tt, cond).float()
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([torch.zeros_like(cond), cond])).float()
    eps_null, eps_cond = both.chunk(2)
    return (1 - gamma) * eps_null + gamma * eps_cond


def classifier_eps(
    eps: Tensor, x: Tensor, t: Tensor, alpha_bar: Tensor, score: Score, scale: float
) -> Tensor:
    """Add classifier guidance to a noise prediction: x̂_0 moves by ``scale``·∇ score(x̂_0) (module docstring)."""
    if scale == 0:
        return eps
    a = alpha_bar.to(x.device)[t].to(x.dtype)
    a = a.view(-1, *([1] * (x.ndim - 1))) if a.ndim else a
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).detach()
    with torch.enable_grad():
        x0 = x0.requires_grad_()
        (grad,) = torch.autograd.grad(score(x0).sum(), x0)
    return eps - scale * (a / (1 - a)).sqrt() * grad


def guided_eps_fn(
    model: Denoiser,
    cond: Tensor,
    gamma: float,
    alpha_bar: Tensor | None = None,
    score: Score | None = None,
    classifier_scale: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``eps_fn(x, t)`` for :func:`meta_vqa.diffusion.schedule.sample`: CFG, plus HyperCLIP if a scale is set."""

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        eps = cfg_eps(model, x, t, cond, gamma)
        if score is not None and classifier_scale != 0:
            eps = classifier_eps(eps, x, t, alpha_bar, score, classifier_scale)
        return eps

    return eps_fn


def optimize_latents(
    z_init: Tensor,
    score: Score,
    steps: int = 50,
    lr: float = 1e-3,
    prior_weight: float = 0.0,
    langevin: float = 0.0,
    cosine_lr: bool = False,
    generator: torch.Generator | None = None,
    noise_rows: int | None = None,
) -> Tensor:
    """HyperCLIP classifier guidance by optimisation (the paper's guidance), every task at once.

    Minimises ``−score(z) + (λ/2)·||z − z_init||²`` per row with Adam (elementwise, so one optimiser over
    ``[B, d]`` is B independent ones: independent problems, e.g. the controls of a test batch, can be
    stacked along the rows); ``langevin`` > 0 adds ε·N(0, I)/√lr to each gradient, drawn for the first
    ``noise_rows`` rows and repeated over the rest (stacked copies of one problem see the noise a
    separate run of it would). Only the gradient with respect to ``z`` is taken: the score's parameters
    get none.
    """
    z = z_init.detach().clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine_lr and steps > 0 else None
    period = noise_rows or z.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            loss = -score(z)
            if prior_weight:
                loss = loss + 0.5 * prior_weight * (z - z_init.detach()).pow(2).sum(-1)
            (grad,) = torch.autograd.grad(loss.sum(), z)
            if langevin:
                shape = (period, *z.shape[1:])
                noise = torch.randn(shape, generator=generator, device=z.device, dtype=z.dtype)
                grad = grad + (langevin / lr**0.5) * noise.repeat(z.shape[0] // period, *([1] * (z.ndim - 1)))
            z.grad = grad
            opt.step()
            if sched is not None:
                sched.step()
    return z.detach()
