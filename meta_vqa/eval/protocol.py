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
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from meta_vqa.data.batch import TaskBatch
from meta_vqa.meta.maml import Budget, InnerLoop, adapt_tasks, planned_hits
from meta_vqa.nets.adapter import ResidualAdapter

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


def majority_correct(batch: TaskBatch, support_mask: Tensor, query_mask: Tensor) -> Tensor:
    """Query hits of always answering the support set's most frequent answer (first one on ties)."""
    K = batch.answers.shape[1]
    counts = (torch.nn.functional.one_hot(batch.support_y, K) & support_mask.unsqueeze(-1)).sum(1)
    top = counts.argmax(1)  # argmax returns the first maximum
    return ((batch.query_y == top.unsqueeze(1)) & query_mask).sum(1)


Weights = Callable[[Tensor], Tensor]  # per-task parameters [B, P] -> flat adapter weights [B, D]


def fine_tune(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    init: Tensor,
    loop: InnerLoop,
    to_weights: Weights | None = None,
    support: tuple[Tensor, Tensor, Tensor] | None = None,
    budget: Budget | None = None,
) -> Tensor:
    """``init`` [B, P] fine-tuned by ``loop`` on each task's support examples (detached result), rows in
    the batch's task order.

    ``support``: ``(x, y, mask)`` to fine-tune on instead of the batch's support split (e.g. a k-shot
    subset); ``to_weights`` maps parameters to adapter weights (identity: they are weights). The tasks
    are planned by ``budget`` (:func:`meta_vqa.meta.maml.adapt_tasks`): every task of a group through the
    shared layers at once, the adapter per bucket of tasks of similar support size.
    """
    if support is not None:
        batch = with_support(batch, *support)
    return adapt_tasks([batch], [init], adapter, loop, to_weights, "support", budget)[0]


def with_support(batch: TaskBatch, x: Tensor, y: Tensor, mask: Tensor) -> TaskBatch:
    """The batch with another support set (the other fields shared, not copied)."""
    return replace(batch, support_x=x, support_y=y, support_mask=mask)


def with_query(batch: TaskBatch, mask: Tensor) -> TaskBatch:
    """The batch with only the query examples of ``mask`` (a mask, no copy)."""
    return replace(batch, query_mask=mask & batch.query_mask)


def query_hits(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    params: Tensor,
    to_weights: Weights | None = None,
    query_mask: Tensor | None = None,
    budget: Budget | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task ``(correct, total)`` on the query split (or the examples of ``query_mask``)."""
    tasks = batch if query_mask is None else with_query(batch, query_mask)
    return planned_hits([tasks], [params], adapter, to_weights, "query", budget)[0]


def query_accuracy(
    adapter: ResidualAdapter,
    batch: TaskBatch,
    params: Tensor,
    to_weights: Weights | None = None,
    budget: Budget | None = None,
) -> Tensor:
    """Per-task query accuracy (%) of the weights of ``params``."""
    correct, total = query_hits(adapter, batch, params, to_weights, budget=budget)
    return 100 * correct / total.clamp(min=1)


@dataclass
class ShotResult:
    """Per-task query hits and counts for one shots setting; ``eligible`` marks tasks that take part."""

    correct: Tensor
    total: Tensor
    eligible: Tensor


@dataclass
class Protocol:
    """The evaluation protocol: which shots to run, the fine-tuning loop, the subset seed, and the memory
    budget of its batched passes."""

    loop: InnerLoop = field(default_factory=InnerLoop)
    max_shots: int = 5
    full: bool = True
    seed: int = 42
    budget: Budget = field(default_factory=Budget)

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

        Every setting's fine-tuning runs in one planned call (:func:`meta_vqa.meta.maml.adapt_tasks`):
        the same start fine-tuned on the whole support and on each k-shot subset, so a pass through the
        shared layers serves all settings; the query scoring of all settings is one planned call too.
        """
        init = init.detach()
        n_answers = batch.answer_mask.sum(1)
        all_tasks = torch.ones(len(batch), dtype=torch.bool, device=batch.device)
        settings = list(shots if shots is not None else self.settings())
        masks, supports = {}, {}
        for s in settings:
            if s == 0 or s == "full":
                masks[s] = (batch.support_mask, batch.query_mask, all_tasks)
            else:
                masks[s] = kshot_masks(batch, int(s), self.max_shots, self.seed)
            if s == "full":
                supports[s] = batch
            elif s != 0:  # a mask: each bucket gathers its tasks' k-shot examples (data/batch.py)
                supports[s] = replace(batch, support_mask=masks[s][0])
        tuned = [s for s in settings if s != 0]
        params = {0: init} if 0 in settings else {}
        if tuned:
            problems = [supports[s] for s in tuned]
            adapted = adapt_tasks(
                problems, [init] * len(problems), adapter, self.loop, to_weights, "support", self.budget
            )
            params.update(zip(tuned, adapted))
        scored = planned_hits(
            [with_query(batch, masks[s][1]) for s in settings],
            [params[s] for s in settings],
            adapter,
            to_weights,
            "query",
            self.budget,
        )
        out: dict[str, dict[Shots, ShotResult]] = {"model": {}, "chance": {}, "majority": {}}
        for s, (correct, total) in zip(settings, scored):
            smask, qmask, eligible = masks[s]
            out["model"][s] = ShotResult(correct, total, eligible)
            out["chance"][s] = ShotResult(total.float() / n_answers, total, eligible)
            if s != 0:
                out["majority"][s] = ShotResult(majority_correct(batch, smask, qmask), total, eligible)
        return out
