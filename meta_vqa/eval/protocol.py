"""Zero-shot and few-shot evaluation on batches of tasks (the paper's protocol), shared by every stage.

Few-shot variants:
* ``"full"``: fine-tune on the whole support set.
* ``k`` in 1..N (the n-shot trials): keep only the answers with at least N support examples (in support
  and query; the label space keeps all K answers), use the first k examples per kept answer of a seeded
  per-task permutation, fine-tune, score on the filtered query set. A task takes part only if at least
  two of its answers are kept. Unlike the authors' code, eligibility is decided on the *filtered*
  answers and the permutation seed is really used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from meta_vqa.data.batch import TaskBatch
from meta_vqa.meta.maml import InnerLoop, adapt
from meta_vqa.nets.adapter import ResidualAdapter, task_correct, task_losses

Shots = int | str  # 0 (zero-shot), "full", or k examples per answer


def rank_within_answer(labels: Tensor, mask: Tensor, keys: Tensor) -> Tensor:
    """For each valid example, its rank among the task's examples with the same label, ordered by ``keys``.

    ``labels``, ``mask``, ``keys`` (floats in [0, 1)) are ``[B, S]``; invalid entries get a large rank.
    """
    big = float(labels.max().item() + 2) if labels.numel() else 2.0
    sort_key = torch.where(mask, labels.float() + keys, torch.full_like(keys, big))
    order = sort_key.argsort(dim=1)
    ys = torch.where(mask, labels, torch.full_like(labels, -1)).gather(1, order)
    pos = torch.arange(labels.shape[1], device=labels.device).expand_as(ys)
    new_group = torch.ones_like(ys, dtype=torch.bool)
    new_group[:, 1:] = ys[:, 1:] != ys[:, :-1]
    start = torch.where(new_group, pos, torch.zeros_like(pos)).cummax(dim=1).values
    rank = torch.empty_like(pos).scatter_(1, order, pos - start)
    return torch.where(mask, rank, torch.full_like(rank, labels.shape[1] + 1))


def task_keys(task: Tensor, length: int, seed: int) -> Tensor:
    """Per-task uniform keys ``[B, length]`` that depend only on (seed, task id), not on the batch."""
    rows = [
        torch.rand(length, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(t))) for t in task
    ]
    return torch.stack(rows).to(task.device)


def kshot_masks(batch: TaskBatch, k: int, max_k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(support_mask, query_mask, eligible)`` of the k-shot trial with answers filtered at ``max_k``."""
    K = batch.answers.shape[1]
    onehot = torch.nn.functional.one_hot(batch.support_y, K) & batch.support_mask.unsqueeze(-1)
    kept = onehot.sum(1) >= max_k  # [B, K] answers with at least max_k support examples
    eligible = kept.sum(1) >= 2
    keys = task_keys(batch.task, batch.support_y.shape[1], seed)
    rank = rank_within_answer(batch.support_y, batch.support_mask, keys)
    s_kept = kept.gather(1, batch.support_y) & batch.support_mask
    q_kept = kept.gather(1, batch.query_y) & batch.query_mask
    e = eligible.unsqueeze(1)
    return s_kept & (rank < k) & e, q_kept & e, eligible


def pack(x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's masked-in examples moved to the front (in their order), padding beyond the largest
    count dropped: a k-shot support set then costs k·K examples per step, not the whole padded support."""
    width = max(int(mask.sum(1).max().item()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x, y.gather(1, order), mask.gather(1, order)


def majority_correct(batch: TaskBatch, support_mask: Tensor, query_mask: Tensor) -> Tensor:
    """Query hits of always answering the support set's most frequent answer (first one on ties)."""
    K = batch.answers.shape[1]
    counts = (torch.nn.functional.one_hot(batch.support_y, K) & support_mask.unsqueeze(-1)).sum(1)
    top = counts.argmax(1)  # argmax returns the first maximum
    return ((batch.query_y == top.unsqueeze(1)) & query_mask).sum(1)


Weights = Callable[[Tensor], Tensor]  # per-task parameters [B, P] -> flat adapter weights [B, D]


def _identity(p: Tensor) -> Tensor:
    return p


def fine_tune(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    init: Tensor,
    loop: InnerLoop,
    to_weights: Weights | None = None,
    support: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """``init`` [B, P] fine-tuned by ``loop`` on each task's support examples (detached result).

    ``support``: ``(x, y, mask)`` to fine-tune on instead of the batch's support split (e.g. a k-shot
    subset); ``to_weights`` maps parameters to adapter weights (identity: they are weights).
    """
    to_w = to_weights or _identity
    sx, sy, sm = support if support is not None else (batch.support_x, batch.support_y, batch.support_mask)

    def inner_loss(p: Tensor) -> Tensor:
        return task_losses(adapter(to_w(p), sx, batch.answers, batch.answer_mask), sy, sm)

    return adapt(init.detach(), inner_loss, loop, track_meta_grad=False)


def adapt_on_support(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    init: Tensor,
    loop: InnerLoop,
    to_weights: Weights | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`fine_tune` on the support split, run in chunks of at most ``chunk_size`` tasks of similar
    support size (bounded memory, little padding); rows come back in the batch's task order."""
    parts = batch.chunked(chunk_size, by="support")
    if len(parts) == 1:
        return fine_tune(adapter, parts[0][1], init, loop, to_weights)
    out = torch.empty_like(init, dtype=init.dtype)
    for idx, chunk in parts:
        out[idx] = fine_tune(adapter, chunk, init[idx], loop, to_weights)
    return out


def query_hits(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    params: Tensor,
    to_weights: Weights | None = None,
    query_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task ``(correct, total)`` on the query split (or the examples of ``query_mask``)."""
    to_w = to_weights or _identity
    with torch.no_grad():
        logits = adapter(to_w(params), batch.query_x, batch.answers, batch.answer_mask)
    return task_correct(logits, batch.query_y, batch.query_mask if query_mask is None else query_mask)


def query_accuracy(
    adapter: ResidualAdapter, batch: TaskBatch, params: Tensor, to_weights: Weights | None = None
) -> Tensor:
    """Per-task query accuracy (%) of the weights of ``params``."""
    correct, total = query_hits(adapter, batch, params, to_weights)
    return 100 * correct / total.clamp(min=1)


@dataclass
class ShotResult:
    """Per-task query hits and counts for one shots setting; ``eligible`` marks tasks that take part."""

    correct: Tensor
    total: Tensor
    eligible: Tensor


@dataclass
class Protocol:
    """The evaluation protocol: which shots to run, the fine-tuning loop, the subset seed."""

    loop: InnerLoop = field(default_factory=InnerLoop)
    max_shots: int = 5
    full: bool = True
    seed: int = 42

    def settings(self) -> list[Shots]:
        return [0] + (["full"] if self.full else []) + list(range(1, self.max_shots + 1))

    def evaluate(
        self,
        adapter: ResidualAdapter,
        batch: TaskBatch,
        init: Tensor,
        to_weights: Callable[[Tensor], Tensor] | None = None,
        shots: Sequence[Shots] | None = None,
    ) -> dict[str, dict[Shots, ShotResult]]:
        """Score ``init`` (per-task parameters ``[B, P]``) zero-shot and after fine-tuning.

        ``to_weights`` maps parameters to flat adapter weights (identity when they already are weights,
        a generator for latents). Returns ``{"model", "chance", "majority"}`` dicts keyed by shots;
        chance "hits" are expected values (n/K).
        """
        init = init.detach()
        n_answers = batch.answer_mask.sum(1)
        out: dict[str, dict[Shots, ShotResult]] = {"model": {}, "chance": {}, "majority": {}}
        all_tasks = torch.ones(len(batch), dtype=torch.bool, device=batch.device)
        for s in shots if shots is not None else self.settings():
            if s == 0 or s == "full":
                smask, qmask, eligible = batch.support_mask, batch.query_mask, all_tasks
            else:
                smask, qmask, eligible = kshot_masks(batch, int(s), self.max_shots, self.seed)
            if s == 0:
                params = init
            else:
                support = None if s == "full" else pack(batch.support_x, batch.support_y, smask)
                params = fine_tune(adapter, batch, init, self.loop, to_weights, support)
            correct, total = query_hits(adapter, batch, params, to_weights, qmask)
            out["model"][s] = ShotResult(correct, total, eligible)
            out["chance"][s] = ShotResult(total.float() / n_answers, total, eligible)
            if s != 0:
                out["majority"][s] = ShotResult(majority_correct(batch, smask, qmask), total, eligible)
        return out
