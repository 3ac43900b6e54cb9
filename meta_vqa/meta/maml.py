"""Batched MAML: the inner loop runs for many tasks at once.

Every task owns one row of a ``[B, P]`` parameter tensor (MNet weights or a hypernetwork latent).
The inner loss is a vector of per-task losses ``[B]`` in which row ``b`` depends only on parameter row
``b``, so the gradient of their *sum* with respect to the ``[B, P]`` tensor holds every task's own
gradient in its row: one backward pass adapts all tasks.

First-order MAML (the paper's default) treats the adapted parameters as ``θ_0 + stop_grad(θ_K - θ_0)``:
the outer gradient passes straight to the initial parameters. Second-order keeps the graph of the
inner steps (``create_graph=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InnerLoop:
    """Settings of the inner loop (SPEC §4.1: 10 full-batch GD steps at lr 0.1, first-order).

    ``optimizer="adam"`` is the per-task Adam used to fine-tune HVAE latents (SPEC §4.7: 50 steps, lr 1e-3);
    it is only available first-order.
    """

    steps: int = 10
    lr: float = 0.1
    first_order: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"


def adapt(init: Tensor, inner_loss: LossFn, loop: InnerLoop, track_meta_grad: bool = True) -> Tensor:
    """Run the inner loop from ``init`` ``[B, P]``; ``inner_loss(params) -> [B]`` per-task losses.

    Args:
        init: initial per-task parameters, typically an expanded meta-parameter (graph to it kept).
        inner_loss: per-task losses; row b must depend only on ``params[b]``.
        loop: steps, learning rate, order and optimiser.
        track_meta_grad: if False the result is detached (evaluation / fine-tuning only).

    Returns:
        adapted parameters ``[B, P]``; with ``track_meta_grad`` their gradient flows to ``init``
        (identity map in first-order mode, through the inner steps in second-order mode).
    """
    if loop.steps == 0:
        return init if track_meta_grad else init.detach()
    second_order = track_meta_grad and not loop.first_order
    if second_order and loop.optimizer != "sgd":
        raise ValueError("second-order MAML is implemented for the SGD inner loop only")
    with torch.enable_grad():
        if second_order:
            params = init if init.requires_grad else init.detach().requires_grad_()
            for _ in range(loop.steps):
                (grad,) = torch.autograd.grad(inner_loss(params).sum(), params, create_graph=True)
                params = params - loop.lr * grad
            return params
        params = init.detach()
        if loop.optimizer == "sgd":
            for _ in range(loop.steps):
                params = params.requires_grad_()
                (grad,) = torch.autograd.grad(inner_loss(params).sum(), params)
                params = (params - loop.lr * grad).detach()
        else:
            params = _adam(params, inner_loss, loop.steps, loop.lr)
    if not track_meta_grad:
        return params
    return init + (params - init).detach()  # first-order: d(adapted)/d(init) = identity


def _adam(
    params: Tensor, inner_loss: LossFn, steps: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> Tensor:
    """Independent Adam per task row (elementwise, so batching over tasks changes nothing)."""
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)
    for t in range(1, steps + 1):
        params = params.requires_grad_()
        (grad,) = torch.autograd.grad(inner_loss(params).sum(), params)
        params = params.detach()
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        params = params - lr * m_hat / (v_hat.sqrt() + eps)
    return params


def chunk_slices(n: int, chunk_size: int | None) -> Iterable[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``chunk_size`` (all at once if None or <= 0)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return (slice(i, min(i + step, n)) for i in range(0, n, step))
