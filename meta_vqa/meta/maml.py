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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from meta_vqa.nets.adapter import task_correct, task_losses

LossFn = Callable[[Tensor], Tensor]
Split = Literal["support", "query", "all"]


@dataclass(frozen=True)
class InnerLoop:
    """Settings of the inner loop (the paper: 10 full-batch GD steps at lr 0.1, first-order).

    ``optimizer="adam"`` is the per-task Adam used to fine-tune HVAE latents (the authors: 50 steps, lr 1e-3);
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


def plan_chunks(sizes: Sequence[int], max_tasks: int | None, max_padding: float = 1.5) -> list[list[int]]:
    """Group tasks into chunks of at most ``max_tasks`` tasks of similar size (positions into ``sizes``).

    Tasks are taken in order of size; a chunk is closed early when adding the next task would make it
    hold more than ``max_padding`` times its real examples (every task of a chunk is padded to its
    largest). Meta-VQA's task sizes are long-tailed (a few tasks have 30x the median), and chunks by
    count alone padded whole chunks to their largest task. ``max_tasks`` None or <= 0: one chunk.
    """
    n = len(sizes)
    if not max_tasks or max_tasks <= 0 or n <= 1:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: sizes[i])  # stable: ties keep their batch order
    groups: list[list[int]] = []
    real = 0
    for i in order:
        g = groups[-1] if groups else None
        if (
            g is not None
            and len(g) < max_tasks
            and (len(g) + 1) * sizes[i] <= max_padding * (real + sizes[i])
        ):
            g.append(i)
            real += sizes[i]
        else:
            groups.append([i])
            real = sizes[i]
    return groups


class Tasks(Protocol):
    """What the outer step needs of a batch of tasks (:class:`meta_vqa.data.batch.TaskBatch` has it)."""

    answers: Tensor  # [B, K, d]
    answer_mask: Tensor  # [B, K]

    def __len__(self) -> int: ...

    def split(self, which: str) -> tuple[Tensor, Tensor, Tensor]: ...


@dataclass
class OuterResult:
    """Per-task outer losses (graph to the meta-parameters), query hits and counts, adapted parameters."""

    losses: Tensor  # [B]
    correct: Tensor  # [B]
    total: Tensor  # [B]
    adapted: Tensor  # [B, P]


def outer_losses(
    tasks: Tasks,
    init: Tensor,
    to_weights: Callable[[Tensor], Tensor],
    adapter: nn.Module,
    loop: InnerLoop,
    inner_split: Split = "support",
    outer_split: Split = "query",
) -> OuterResult:
    """Adapt ``init`` [B, P] on ``inner_split`` (``loop``), then the outer loss on ``outer_split``.

    ``to_weights`` maps the per-task parameters to flat adapter weights (identity for an MNet, the
    hypernetwork for latents); ``adapter(weights, x, answers, answer_mask)`` gives the logits.
    """
    x, y, m = tasks.split(inner_split)

    def inner_loss(p: Tensor) -> Tensor:
        return task_losses(adapter(to_weights(p), x, tasks.answers, tasks.answer_mask), y, m)

    adapted = adapt(init, inner_loss, loop)
    x, y, m = tasks.split(outer_split)
    logits = adapter(to_weights(adapted), x, tasks.answers, tasks.answer_mask)
    correct, total = task_correct(logits, y, m)
    return OuterResult(task_losses(logits, y, m), correct, total, adapted)


@dataclass
class MetaStepStats:
    """Means over the meta-batch of one meta-step: outer loss, outer accuracy (%), ||adapted − init||."""

    loss: Tensor
    accuracy: Tensor
    shift: Tensor
    tasks: int  # tasks in the meta-batch


def meta_gradient(
    chunks: Iterable[Tasks],
    init: Callable[[Tasks], Tensor],
    to_weights: Callable[[Tensor], Tensor],
    adapter: nn.Module,
    loop: InnerLoop,
    inner_split: Split,
    outer_split: Split,
    backward: Callable[[Tensor], None] = Tensor.backward,
    divisor: float | None = None,
) -> MetaStepStats:
    """Accumulate the meta-gradient of one meta-batch, given as chunks of tasks, by calling ``backward``.

    The meta-gradient is the plain mean of the per-task outer-loss gradients over the whole meta-batch
    (each chunk's losses are summed and divided by the number of tasks in all chunks), whatever the
    chunking. The authors' loop counted the last task of every meta-batch twice; this is the mean the
    paper describes. ``init(chunk)`` gives the chunk's initial parameters ``[b, P]`` with their graph to
    the meta-parameters. ``divisor`` replaces the task count in the division: a DDP rank holding part of
    the meta-batch divides its sum by ``total tasks / ranks``, so that DDP's average of the ranks'
    gradients is the mean over the whole meta-batch. The returned statistics are this call's own means.
    """
    chunks = list(chunks)
    n = max(sum(len(c) for c in chunks), 1)
    div = n if divisor is None else divisor
    loss_sum = acc_sum = shift_sum = 0.0
    for chunk in chunks:
        start = init(chunk)
        res = outer_losses(chunk, start, to_weights, adapter, loop, inner_split, outer_split)
        backward(res.losses.sum() / div)
        loss_sum = loss_sum + res.losses.detach().sum()
        acc_sum = acc_sum + (res.correct / res.total.clamp(min=1)).sum()
        shift_sum = shift_sum + (res.adapted.detach() - start.detach()).norm(dim=-1).sum()
    return MetaStepStats(loss_sum / n, 100 * acc_sum / n, shift_sum / n, n)


def chunk_slices(n: int, chunk_size: int | None) -> Iterable[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``chunk_size`` (all at once if None or <= 0)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return (slice(i, min(i + step, n)) for i in range(0, n, step))
