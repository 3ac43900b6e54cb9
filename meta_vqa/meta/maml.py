"""Batched MAML: the inner loop runs for many tasks at once.

Every task owns one row of a ``[B, P]`` parameter tensor (MNet weights or a hypernetwork latent).
The inner loss is a vector of per-task losses ``[B]`` in which row ``b`` depends only on parameter row
``b``, so the gradient of their *sum* with respect to the ``[B, P]`` tensor holds every task's own
gradient in its row: one backward pass adapts all tasks.

First-order MAML (the paper's default) treats the adapted parameters as ``θ_0 + stop_grad(θ_K - θ_0)``:
the outer gradient passes straight to the initial parameters. Second-order keeps the graph of the
inner steps (``create_graph=True``).

Work plan. Two kinds of work have different costs. The map from parameters to adapter weights
(``to_weights``: the hypernetwork, whose output layer of 128 × 394,240 weights every task shares) is
bound by reading that matrix, so it should see as many tasks per pass as memory allows. The adapter's
products are per task, so they should see no padding. :func:`plan_work` therefore cuts a batch into
*groups* (one pass through ``to_weights`` each, as many tasks as the memory budget holds) and each group
into *buckets* of tasks of similar size (one adapter pass each, padding bounded). :class:`BucketedLoss`
runs a step as: weights of the whole group, the adapter's loss and weight-gradient bucket by bucket (its
activations freed after each), then one backward pass through ``to_weights``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from meta_vqa.nets.adapter import autocast_on, task_correct, task_losses

LossFn = Callable[[Tensor], Tensor]
Split = Literal["support", "query", "all"]
Rows = slice | Tensor  # contiguous rows, or an index tensor

HALF = (torch.float16, torch.bfloat16)

# Working memory of the plan, in copies of one flat weight vector per task (see Budget).
GROUP_COPIES = 3  # a group's weights, their gradient, one temporary (e.g. a loss-scaled copy under AMP)
BUCKET_COPIES = 2  # a bucket's gathered weights and gradient (index rows, the autograd path)


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


@dataclass(frozen=True)
class Budget:
    """How many tasks one batched pass may take.

    Args:
        max_mib: memory budget of one group, in MiB: half for the group's flat weight vectors and their
            gradients (``GROUP_COPIES`` per task), half for the bucket being run (its weight copies and
            the adapter's activations per padded example). None: every task in one group, buckets bounded
            by padding only.
        max_padding: a bucket holds at most this many times its real examples (every task of a bucket is
            padded to its largest).
        max_tasks: at most this many tasks per bucket (the deprecated ``chunk_size``; None: no limit).
        bucket_flops: the fixed cost of one adapter pass (Python, autograd, kernel launches) in FLOPs of
            adapter work: a bucket whose padded work stays below it is merged whatever its padding (small
            adapters, small tasks). About 1 ms of a CPU core.
    """

    max_mib: float | None = 1024.0
    max_padding: float = 1.5
    max_tasks: int | None = None
    bucket_flops: float = 5e7

    def _half(self) -> float | None:
        return None if self.max_mib is None else self.max_mib * 2**19  # half the budget, in bytes

    def group_tasks(self, weight_bytes: int) -> int | None:
        """Tasks per shared pass (None: no limit) when one flat weight vector takes ``weight_bytes``."""
        half = self._half()
        return None if half is None else max(1, int(half // (GROUP_COPIES * weight_bytes)))

    def bucket_bytes(self) -> float | None:
        return self._half()


def plan_buckets(
    sizes: Sequence[int],
    max_padding: float = 1.5,
    max_tasks: int | None = None,
    max_bytes: float | None = None,
    task_bytes: int = 0,
    row_bytes: int = 0,
    min_rows: float = 0,
) -> list[list[int]]:
    """Buckets of tasks of similar size (positions into ``sizes``), in order of size.

    A bucket is closed before a task when adding it would make the bucket hold more than ``max_padding``
    times its real examples (each task is padded to the largest) and more than ``min_rows`` padded
    examples, more than ``max_tasks`` tasks, or more than ``max_bytes`` of working memory (``task_bytes``
    per task plus ``row_bytes`` per padded example). Meta-VQA's task sizes are long-tailed (a few tasks
    have 30x the median): buckets keep the large tasks from padding the rest.
    """
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])  # stable: ties keep their batch order
    buckets: list[list[int]] = []
    real = 0
    for i in order:
        b = buckets[-1] if buckets else None
        n, s = (len(b) + 1, max(sizes[i], 1)) if b is not None else (1, 1)
        fits = (
            b is not None
            and (n * s <= max_padding * (real + sizes[i]) or n * s <= min_rows)
            and (not max_tasks or max_tasks <= 0 or n <= max_tasks)
            and (max_bytes is None or n * (task_bytes + s * row_bytes) <= max_bytes)
        )
        if fits:
            b.append(i)
            real += sizes[i]
        else:
            buckets.append([i])
            real = sizes[i]
    return buckets


def plan_chunks(sizes: Sequence[int], max_tasks: int | None, max_padding: float = 1.5) -> list[list[int]]:
    """Chunks of at most ``max_tasks`` tasks of similar size (:func:`plan_buckets`); ``max_tasks`` None or
    <= 0: one chunk in batch order."""
    n = len(sizes)
    if not max_tasks or max_tasks <= 0 or n <= 1:
        return [list(range(n))]
    return plan_buckets(sizes, max_padding, max_tasks)


@dataclass(frozen=True)
class Group:
    """Tasks that share one pass through ``to_weights``: positions into the planned sizes, in bucket order;
    ``buckets`` are consecutive ranges of ``rows`` (one adapter pass each)."""

    rows: list[int]
    buckets: list[slice]


def plan_work(
    sizes: Sequence[int], budget: Budget, weight_bytes: int, row_bytes: int, row_flops: float = math.inf
) -> list[Group]:
    """Groups of buckets for tasks of ``sizes`` examples (see the module docstring).

    Tasks are taken in order of size and cut into groups of equal counts, as few as the budget allows;
    each group into buckets (:func:`plan_buckets`). ``weight_bytes``: one flat weight vector;
    ``row_bytes``, ``row_flops``: the adapter's working memory and work per example (``inf``: buckets
    are never merged for their small size).
    """
    n = len(sizes)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: sizes[i])
    per_group = budget.group_tasks(weight_bytes)
    n_groups = 1 if per_group is None else math.ceil(n / per_group)
    cuts = [round(k * n / n_groups) for k in range(n_groups + 1)]
    groups = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        members = order[a:b]
        buckets = plan_buckets(
            [sizes[i] for i in members],
            budget.max_padding,
            budget.max_tasks,
            budget.bucket_bytes(),
            BUCKET_COPIES * weight_bytes,
            row_bytes,
            budget.bucket_flops / row_flops,
        )
        rows, spans = [], []
        for bucket in buckets:
            spans.append(slice(len(rows), len(rows) + len(bucket)))
            rows.extend(members[j] for j in bucket)
        groups.append(Group(rows, spans))
    return groups


def take(x: Tensor, rows: Rows) -> Tensor:
    """Rows of ``x`` (a view for a slice)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def as_rows(positions: Sequence[int], device: torch.device | None = None) -> Rows:
    """A slice for consecutive positions, else an index tensor."""
    if positions and list(positions) == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return torch.tensor(list(positions), dtype=torch.long, device=device)


# --- the loss of a group: one pass through the shared layers, the adapter per bucket ----------------------
@dataclass
class Examples:
    """One split of some tasks, trimmed to the largest: answers ``[b, K, d]`` and mask, examples ``x``
    ``[b, n, d]``, labels ``y`` and mask ``[b, n]``."""

    answers: Tensor
    answer_mask: Tensor
    x: Tensor
    y: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        """Stack along the task axis, padding examples and answers to the widest part."""
        if len(parts) == 1:
            return parts[0]
        n = max(p.x.shape[1] for p in parts)
        k = max(p.answers.shape[1] for p in parts)

        def pad(t: Tensor, width: int, value=0) -> Tensor:
            extra = width - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, t.new_full(shape, value)], 1)

        return Examples(
            torch.cat([pad(p.answers, k) for p in parts]),
            torch.cat([pad(p.answer_mask, k, False) for p in parts]),
            torch.cat([pad(p.x, n) for p in parts]),
            torch.cat([pad(p.y, n) for p in parts]),
            torch.cat([pad(p.mask, n, False) for p in parts]),
        )


def example_losses(adapter: nn.Module, w: Tensor, ex: Examples) -> Tensor:
    """Per-task mean cross-entropy ``[b]`` of weights ``w`` ``[b, D]`` on ``ex``."""
    return task_losses(adapter(w, ex.x, ex.answers, ex.answer_mask), ex.y, ex.mask)


class BucketedLoss:
    """Per-task losses of parameters ``[B, P]``: ``to_weights`` runs once for all B rows, the adapter bucket
    by bucket (``buckets``: consecutive row ranges covering ``0..B``, each with its examples).

    Calling it gives the losses with their graph. :meth:`value_and_grad` gives the losses and their
    gradient with respect to the parameters the memory-bounded way: the gradient with respect to each
    bucket's weights is taken while only that bucket's activations are alive, then one backward pass
    through ``to_weights`` carries all of them (with ``create_graph`` for second-order MAML, where the
    buckets' graphs are kept).
    """

    def __init__(
        self,
        to_weights: Callable[[Tensor], Tensor],
        adapter: nn.Module,
        buckets: Sequence[tuple[slice, Examples]],
    ):
        self.to_weights, self.adapter, self.buckets = to_weights, adapter, list(buckets)

    def __call__(self, p: Tensor) -> Tensor:
        w = self.to_weights(p)
        return torch.cat([example_losses(self.adapter, w[s], ex) for s, ex in self.buckets])

    def value_and_grad(self, p: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """``(losses [B] detached, d Σ losses / d p [B, P])``."""
        w = self.to_weights(p)
        if not create_graph and _by_hand(self.adapter, w.device):
            g_w, w_data = torch.empty_like(w, requires_grad=False), w.detach()
            losses = torch.cat(
                [
                    self.adapter.loss_grad(
                        w_data[s], ex.x, ex.answers, ex.answer_mask, ex.y, ex.mask, out=g_w[s]
                    )[0]
                    for s, ex in self.buckets
                ]
            )
        else:
            parts, grads = [], []
            for s, ex in self.buckets:
                wb = w[s] if create_graph else w[s].detach().requires_grad_()
                loss = example_losses(self.adapter, wb, ex)
                (g,) = torch.autograd.grad(loss.sum(), wb, create_graph=create_graph)
                parts.append(loss.detach())
                grads.append(g)
            losses, g_w = torch.cat(parts), grads[0] if len(grads) == 1 else torch.cat(grads)
        if w is p:
            return losses, g_w
        (g_p,) = torch.autograd.grad(w, p, g_w, create_graph=create_graph)
        return losses, g_p


def _by_hand(adapter: nn.Module, device: torch.device) -> bool:
    """Whether the adapter's first-order loss and weight gradient can be taken by hand (its
    ``loss_grad``: the same values, no autograd; not under an autocast of ``device``, where the adapter's
    products run in half precision and its losses in float32: autograd's path)."""
    return hasattr(adapter, "loss_grad") and not autocast_on(device)


def _loss_and_grad(loss: LossFn | BucketedLoss, p: Tensor, create_graph: bool) -> Tensor:
    if isinstance(loss, BucketedLoss):
        return loss.value_and_grad(p, create_graph)[1]
    (grad,) = torch.autograd.grad(loss(p).sum(), p, create_graph=create_graph)
    return grad


def adapt(
    init: Tensor, inner_loss: LossFn | BucketedLoss, loop: InnerLoop, track_meta_grad: bool = True
) -> Tensor:
    """Run the inner loop from ``init`` ``[B, P]``; ``inner_loss(params) -> [B]`` per-task losses.

    Args:
        init: initial per-task parameters, typically an expanded meta-parameter (graph to it kept).
        inner_loss: per-task losses; row b must depend only on ``params[b]``. A :class:`BucketedLoss`
            takes its gradient bucket by bucket with one pass through the shared layers.
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
                grad = _loss_and_grad(inner_loss, params, create_graph=True)
                params = params - loop.lr * grad
            return params
        params = init.detach()
        if loop.optimizer == "sgd":
            for _ in range(loop.steps):
                params = params.requires_grad_()
                grad = _loss_and_grad(inner_loss, params, create_graph=False)
                params = (params - loop.lr * grad).detach()
        else:
            params = _adam(params, inner_loss, loop.steps, loop.lr)
    if not track_meta_grad:
        return params
    return init + (params - init).detach()  # first-order: d(adapted)/d(init) = identity


def _adam(
    params: Tensor,
    inner_loss: LossFn | BucketedLoss,
    steps: int,
    lr: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """Independent Adam per task row (elementwise, so batching over tasks changes nothing)."""
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)
    for t in range(1, steps + 1):
        params = params.requires_grad_()
        grad = _loss_and_grad(inner_loss, params, create_graph=False)
        params = params.detach()
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        params = params - lr * m_hat / (v_hat.sqrt() + eps)
    return params


# --- planned work over the tasks of one or several problems ----------------------------------------------
class Tasks(Protocol):
    """What the planned steps need of a batch of tasks (:class:`meta_vqa.data.batch.TaskBatch` has it)."""

    answers: Tensor  # [B, K, d]

    def __len__(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def sizes(self, which: Split) -> Tensor: ...

    def examples(self, which: Split, rows: Rows) -> Examples: ...

    def select(self, idx: Tensor | slice) -> Tasks: ...


@dataclass
class Subset:
    """The tasks ``idx`` of ``tasks`` as a view: sizes and examples are looked up through ``idx``, so only a
    bucket's own rows are ever gathered."""

    tasks: Tasks
    idx: Tensor

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def answers(self) -> Tensor:
        return self.tasks.answers

    @property
    def device(self) -> torch.device:
        return self.tasks.device

    def sizes(self, which: Split) -> Tensor:
        return self.tasks.sizes(which).index_select(0, self.idx)

    def examples(self, which: Split, rows: Rows) -> Examples:
        return self.tasks.examples(which, take(self.idx, rows))


def _weight_bytes(adapter: nn.Module, dtype: torch.dtype) -> int:
    return adapter.num_params * torch.finfo(dtype).bits // 8


def plan_tasks(
    problems: Sequence[Tasks], which: Split, adapter: nn.Module, budget: Budget, dtype: torch.dtype
) -> tuple[list[tuple[int, int]], list[Group]]:
    """The rows ``(problem, task)`` of one or several problems and their :func:`plan_work` by the size of
    their ``which`` split; within a bucket the rows of one problem are consecutive (one gather each)."""
    rows = [(p, b) for p, t in enumerate(problems) for b in range(len(t))]
    sizes = [int(n) for t in problems for n in t.sizes(which).tolist()]
    k = max(int(t.answers.shape[1]) for t in problems)
    groups = plan_work(
        sizes,
        budget,
        _weight_bytes(adapter, dtype),
        adapter.example_bytes(k, dtype),
        adapter.example_flops(k),
    )
    ordered = []
    for g in groups:
        by_problem = [r for s in g.buckets for r in sorted(g.rows[s], key=lambda r: rows[r][0])]
        ordered.append(Group(by_problem, g.buckets))
    return rows, ordered


def bucket_examples(
    problems: Sequence[Tasks], which: Split, rows: Sequence[tuple[int, int]], members: Sequence[int]
) -> Examples:
    """The ``which`` examples of ``members`` (positions into ``rows``), one gather per problem, stacked."""
    parts, i = [], 0
    while i < len(members):
        p, j = rows[members[i]][0], i
        while j < len(members) and rows[members[j]][0] == p:
            j += 1
        tasks = problems[p]
        parts.append(tasks.examples(which, as_rows([rows[m][1] for m in members[i:j]], tasks.device)))
        i = j
    return Examples.concat(parts)


def _identity(p: Tensor) -> Tensor:
    return p


def adapt_tasks(
    problems: Sequence[Tasks],
    inits: Sequence[Tensor],
    adapter: nn.Module,
    loop: InnerLoop,
    to_weights: Callable[[Tensor], Tensor] | None = None,
    which: Split = "support",
    budget: Budget | None = None,
) -> list[Tensor]:
    """Each problem's ``init`` ``[B_p, P]`` fine-tuned by ``loop`` on its ``which`` split (detached).

    The rows of all problems are planned together (:func:`plan_tasks`): a group takes one pass through
    ``to_weights`` per step whichever problems its rows come from (e.g. the few-shot settings of an
    evaluation: the same start latents, fine-tuned on different support sets). Rows come back in each
    problem's task order.
    """
    budget, to_w = budget or Budget(), to_weights or _identity
    flat = torch.cat([i.detach() for i in inits])
    rows, groups = plan_tasks(problems, which, adapter, budget, flat.dtype)
    out = torch.empty_like(flat)
    for g in groups:
        buckets = [(s, bucket_examples(problems, which, rows, g.rows[s])) for s in g.buckets]
        idx = torch.tensor(g.rows, dtype=torch.long, device=flat.device)
        loss = BucketedLoss(to_w, adapter, buckets)
        out[idx] = adapt(flat.index_select(0, idx), loss, loop, track_meta_grad=False)
    return list(out.split([len(p) for p in problems]))


@torch.no_grad()
def planned_hits(
    problems: Sequence[Tasks],
    params: Sequence[Tensor],
    adapter: nn.Module,
    to_weights: Callable[[Tensor], Tensor] | None = None,
    which: Split = "query",
    budget: Budget | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per problem, per-task ``(correct, total)`` of ``params`` on the ``which`` split, planned like
    :func:`adapt_tasks` (one pass through ``to_weights`` per group, the adapter per bucket)."""
    budget, to_w = budget or Budget(), to_weights or _identity
    flat = torch.cat([p.detach() for p in params])
    rows, groups = plan_tasks(problems, which, adapter, budget, flat.dtype)
    correct = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    total = torch.zeros_like(correct)
    for g in groups:
        idx = torch.tensor(g.rows, dtype=torch.long, device=flat.device)
        w = to_w(flat.index_select(0, idx))
        for s in g.buckets:
            ex = bucket_examples(problems, which, rows, g.rows[s])
            c, t = task_correct(adapter(w[s], ex.x, ex.answers, ex.answer_mask), ex.y, ex.mask)
            correct[idx[s]], total[idx[s]] = c, t
    sizes = [len(p) for p in problems]
    return list(zip(correct.split(sizes), total.split(sizes)))


# --- the meta-step ----------------------------------------------------------------------------------
@dataclass
class MetaStepStats:
    """Means over the meta-batch of one meta-step: outer loss, outer accuracy (%), ||adapted − init||."""

    loss: Tensor
    accuracy: Tensor
    shift: Tensor
    tasks: int  # tasks in the meta-batch


def meta_gradient(
    tasks: Tasks | Sequence[Tasks],
    init: Callable[[Tasks], Tensor],
    to_weights: Callable[[Tensor], Tensor],
    adapter: nn.Module,
    loop: InnerLoop,
    inner_split: Split,
    outer_split: Split,
    backward: Callable[[Tensor], None] = Tensor.backward,
    budget: Budget | None = None,
    divisor: float | None = None,
    defer_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> MetaStepStats:
    """Accumulate the meta-gradient of one meta-batch by calling ``backward`` once per group of tasks.

    The meta-gradient is the plain mean of the per-task outer-loss gradients over the whole meta-batch,
    whatever the grouping (the authors' loop counted the last task of every meta-batch twice; this is the
    mean the paper describes). ``tasks`` is planned by ``budget`` (:func:`plan_work` on the inner split's
    sizes); a list of batches is planned batch by batch (no group spans two of them). ``init(batch)``
    gives a batch's initial parameters ``[b, P]`` with their graph to the meta-parameters (called once
    per meta-step, or once per group on a copy of its tasks when there are several); ``to_weights``
    maps parameters to adapter weights (the identity when they are weights).

    Per group: the inner loop (:func:`adapt` with a :class:`BucketedLoss`: one pass through
    ``to_weights`` per step for the whole group), the adapted weights once more with their graph, the
    outer losses and their gradient with respect to those weights bucket by bucket (:func:`outer_grad`),
    and one ``backward`` (``Tensor.backward`` or Lightning's ``manual_backward``) of the scalar
    ``Σ w·stop_grad(∂L/∂w)`` (:func:`carry_grad`), whose gradient with respect to ``w`` is ``∂L/∂w``: it
    carries that gradient through ``to_weights`` to the meta-parameters. (A scalar, so that a gradient
    scaler scales it like a loss and a non-finite check sees NaN or Inf in the group's gradient.)

    ``divisor`` replaces the task count in the mean: a DDP rank holding part of the meta-batch divides its
    sum by ``total tasks / ranks``, so that DDP's average of the ranks' gradients is the mean over the
    whole meta-batch. ``defer_sync()``, where given, is entered around every group's ``backward`` but the
    last (DDP's ``no_sync``): the gradients are all-reduced once per meta-step, and ranks that cut their
    shares into different numbers of groups still take part in the same number of all-reduces. The
    returned statistics are this call's own means.
    """
    budget = budget or Budget()
    batches = list(tasks) if isinstance(tasks, (list, tuple)) else [tasks]
    n = max(sum(len(t) for t in batches), 1)
    div = n if divisor is None else divisor
    plans = [(b, plan_tasks([b], inner_split, adapter, budget, b.answers.dtype)[1]) for b in batches]
    remaining = sum(len(groups) for _, groups in plans)
    loss_sum = acc_sum = shift_sum = 0.0
    for batch, groups in plans:
        for g in groups:
            remaining -= 1
            order = torch.tensor(g.rows, dtype=torch.long, device=batch.device)
            group = Subset(batch, order)
            # one group: the whole batch's start rows, reordered; several: each group's own (a copy)
            start = init(batch)[order] if len(groups) == 1 else init(batch.select(order))
            inner = BucketedLoss(
                to_weights, adapter, [(s, group.examples(inner_split, s)) for s in g.buckets]
            )
            adapted = adapt(start, inner, loop)
            w = to_weights(adapted)
            out = outer_grad(group, w.detach(), adapter, outer_split, budget, divisor=div)
            defer = defer_sync is not None and remaining > 0
            with defer_sync() if defer else contextlib.nullcontext():
                # ∂L/∂w carried back through to_weights: one pass for the group
                backward(carry_grad(w, out.grad))
            loss_sum = loss_sum + out.losses.sum()
            acc_sum = acc_sum + (out.correct / out.total.clamp(min=1)).sum()
            shift_sum = shift_sum + (adapted.detach() - start.detach()).norm(dim=-1).sum()
    return MetaStepStats(loss_sum / n, 100 * acc_sum / n, shift_sum / n, n)


class _CarryGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        return torch.dot(w.detach().reshape(-1).to(g.dtype), g.reshape(-1)).float()

    @staticmethod
    def backward(ctx, scale: Tensor):
        (g,) = ctx.saved_tensors
        if scale.device.type == "cpu" and scale.item() == 1.0:  # (no device sync on a GPU)
            return g, None
        return g * scale, None


def carry_grad(w: Tensor, g: Tensor) -> Tensor:
    """The float32 scalar ``Σ w·g`` (``g`` a constant, e.g. ``∂L/∂w``) whose gradient with respect to ``w`` is
    ``g`` times the incoming gradient (1, or a gradient scaler's scale): bit for bit the gradient of
    ``(w * g).sum()``, without the two elementwise passes over ``[b, D]`` that one costs (its product in
    the forward pass, ``ones·g`` in the backward). The backward hands ``g`` itself on where nothing scales
    it. ``w`` may be half precision (autocast); ``g`` is float32."""
    return _CarryGrad.apply(w, g)


@dataclass
class OuterResult:
    """Per-task outer losses, query hits and counts, and ``grad`` = ∂(Σ losses / divisor)/∂w ``[b, D]``."""

    losses: Tensor
    correct: Tensor
    total: Tensor
    grad: Tensor


def outer_grad(
    tasks: Tasks, w: Tensor, adapter: nn.Module, which: Split, budget: Budget, divisor: float = 1.0
) -> OuterResult:
    """The losses of weights ``w`` ``[b, D]`` (no graph) on the ``which`` split, bucket by bucket (its own
    sizes), and their gradient with respect to ``w``.

    Half-precision weights (the hypernetwork's output under autocast) are scored in float32 with
    autocast off: the losses are float32, and the gradient is not rounded to half precision before a
    16-mixed gradient scaler has scaled it (small entries would underflow to zero)."""
    if w.dtype in HALF:
        with torch.autocast(w.device.type, enabled=False):
            return outer_grad(tasks, w.float(), adapter, which, budget, divisor)
    k = int(tasks.answers.shape[1])
    wbytes = _weight_bytes(adapter, w.dtype)
    buckets = plan_buckets(
        tasks.sizes(which).tolist(),
        budget.max_padding,
        budget.max_tasks,
        budget.bucket_bytes(),
        BUCKET_COPIES * wbytes,
        adapter.example_bytes(k, w.dtype),
        budget.bucket_flops / adapter.example_flops(k),
    )
    b = len(tasks)
    out = OuterResult(
        w.new_zeros(b),
        torch.zeros(b, dtype=torch.long, device=w.device),
        torch.zeros(b, dtype=torch.long, device=w.device),
        torch.empty_like(w),  # every row belongs to one bucket
    )
    for positions in buckets:
        rows = as_rows(sorted(positions), w.device)
        ex = tasks.examples(which, rows)
        wb = take(w, rows).detach()
        by_hand = _by_hand(adapter, w.device)
        if by_hand:  # a slice's gradient is written in place, into its rows of out.grad
            into = out.grad[rows] if isinstance(rows, slice) else None
            loss, correct, g = adapter.loss_grad(
                wb, ex.x, ex.answers, ex.answer_mask, ex.y, ex.mask, divisor, into
            )
        else:
            with torch.enable_grad():
                wb.requires_grad_()
                logits = adapter(wb, ex.x, ex.answers, ex.answer_mask)
                loss = task_losses(logits, ex.y, ex.mask)
                (g,) = torch.autograd.grad(loss.sum() / divisor, wb)
            correct, _ = task_correct(logits.detach(), ex.y, ex.mask)
            loss = loss.detach()
        if not (by_hand and isinstance(rows, slice)):
            out.grad[rows] = g
        out.losses[rows], out.correct[rows], out.total[rows] = loss, correct, ex.mask.sum(1)
    return out
