"""Noise schedules and samplers: diffusers schedulers behind a small adapter.

The cosine schedule with T = 1000 is diffusers' ``squaredcos_cap_v2`` (s = 0.008, β clipped at 0.999),
the same ᾱ(t) as the paper. ``clip_sample=False`` everywhere: latents are standardised, not bounded.
DDPM uses the posterior variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) (``fixed_small``), as the authors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

Sampler = Literal["ddpm", "ddim", "dpm"]
Schedule = Literal["cosine", "linear"]
EpsFn = Callable[[Tensor, Tensor], Tensor]

_BETA = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def make_scheduler(
    kind: Sampler = "ddpm",
    num_train_timesteps: int = 1000,
    schedule: Schedule = "cosine",
    clip_x0: float | None = None,
):
    """A diffusers scheduler for ε-prediction on unbounded latents.

    ``clip_x0`` (DDPM, DDIM): clamp each step's x̂0 estimate to [−clip_x0, clip_x0] (standardised latents,
    so a few units). Off by default, as the paper. With the cosine schedule the first DDPM step divides by
    √α_{T−1} = √0.001, so a 7 % error of ε̂ there throws x_{T−2} out of the training distribution and the
    chain diverges; the clamp bounds that step.
    """
    clip = {"clip_sample": clip_x0 is not None, "clip_sample_range": float(clip_x0 or 1.0)}
    common = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": _BETA[schedule],
        "beta_start": 1e-4,
        "beta_end": 2e-2,
        "prediction_type": "epsilon",
    }
    if kind == "ddpm":
        return DDPMScheduler(**common, **clip, variance_type="fixed_small")
    # Few-step samplers use "leading" spacing (t = T - T/k, ..., 0): with the cosine schedule ᾱ_{T-1} is
    # ~2e-9 (β clipped at 0.999), so a first step at t = T-1 divides the x0 estimate by √ᾱ ≈ 5e-5 and
    # magnifies any error of ε̂ ~10^4-fold; at t = T - T/k the signal is still only ~3 % of x_t.
    if kind == "ddim":
        return DDIMScheduler(**common, **clip, set_alpha_to_one=True, timestep_spacing="leading")
    if kind == "dpm":
        if clip_x0 is not None:
            raise ValueError("clip_x0 applies to the ddpm and ddim samplers, not dpm")
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="leading"
        )
    raise ValueError(f"unknown sampler {kind!r}")


def alphas_cumprod(num_train_timesteps: int = 1000, schedule: Schedule = "cosine") -> Tensor:
    """ᾱ_t for t = 0..T-1 (float64)."""
    return make_scheduler("ddpm", num_train_timesteps, schedule).alphas_cumprod.double()


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alpha_bar: Tensor) -> Tensor:
    """The forward process in closed form: x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε."""
    a = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    kind: Sampler = "ddpm",
    steps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    num_train_timesteps: int = 1000,
    schedule: Schedule = "cosine",
    progress: bool = False,
    clip_x0: float | None = None,
) -> Tensor:
    """Reverse-process sampling of ``shape`` from N(0, I) with ``steps`` steps of the chosen sampler.

    ``eps_fn(x_t, t)`` predicts the noise; ``t`` is a scalar long tensor. The whole batch (e.g. every
    test task) is sampled at once.
    """
    sched = make_scheduler(kind, num_train_timesteps, schedule, clip_x0)
    sched.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device) * sched.init_noise_sigma
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"{kind} sampling", leave=False)
    for t in timesteps:
        eps = eps_fn(x, t)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x
