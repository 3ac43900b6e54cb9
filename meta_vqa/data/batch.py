"""Batches of tasks as tensors.

The collate function builds a :class:`TaskIndexBatch` (indices into the feature matrices, ``-1`` where
padded). After the batch reaches its device, :meth:`TaskIndexBatch.gather` turns it into a
:class:`TaskBatch` of features, looked up in a feature bank that lives on that device. No per-example
Python runs per step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

from meta_vqa.meta.maml import Examples, Rows, Split, plan_chunks


def _pad(rows: list[list[int]], value: int = -1) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _extent(mask: Tensor) -> int:
    """One past the last column that holds a valid entry (at least 1)."""
    cols = mask.any(0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 1


def _subsample(x: Tensor, y: Tensor, mask: Tensor, n: int | None, generator: torch.Generator | None):
    if n is None or n <= 0 or n >= mask.shape[1]:
        return x, y, mask
    keys = torch.rand(
        mask.shape, generator=generator, device="cpu" if generator is None else generator.device
    )
    keys = torch.where(mask, keys.to(mask.device), torch.full_like(mask, 2.0, dtype=keys.dtype))
    chosen, idx = keys.topk(n, dim=1, largest=False)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), y.gather(1, idx), chosen < 1.5


def pack(x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's masked-in examples moved to the front (in their order), padding beyond the largest
    count dropped: a k-shot support set then costs k·K examples per step, not the whole padded support."""
    width = max(int(mask.sum(1).max().item()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x, y.gather(1, order), mask.gather(1, order)


@dataclass
class FeatureBank:
    """The feature matrices on one device."""

    images: Tensor  # [N, d]
    questions: Tensor  # [Q, d_q]
    answers: Tensor  # [M, d]

    def to(self, device: torch.device) -> FeatureBank:
        return FeatureBank(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


@dataclass
class TaskIndexBatch:
    """A batch of tasks as index tensors (``-1`` = padding)."""

    task: Tensor  # [B] task id (row in the question matrix)
    answer_idx: Tensor  # [B, K] rows in the answer matrix
    support_idx: Tensor  # [B, S] rows in the image matrix
    support_y: Tensor  # [B, S]
    query_idx: Tensor  # [B, Q]
    query_y: Tensor  # [B, Q]

    @classmethod
    def collate(cls, items: list[dict]) -> TaskIndexBatch:
        return cls(
            task=torch.tensor([it["task"] for it in items], dtype=torch.long),
            answer_idx=_pad([it["answers"] for it in items]),
            support_idx=_pad([it["support"] for it in items]),
            support_y=_pad([it["support_y"] for it in items], 0),
            query_idx=_pad([it["query"] for it in items]),
            query_y=_pad([it["query_y"] for it in items], 0),
        )

    def gather(self, bank: FeatureBank) -> TaskBatch:
        """Look the features up (on the bank's device)."""
        return TaskBatch(
            task=self.task,
            question=bank.questions[self.task],
            answers=bank.answers[self.answer_idx.clamp(min=0)],
            answer_mask=self.answer_idx >= 0,
            support_x=bank.images[self.support_idx.clamp(min=0)],
            support_y=self.support_y,
            support_mask=self.support_idx >= 0,
            query_x=bank.images[self.query_idx.clamp(min=0)],
            query_y=self.query_y,
            query_mask=self.query_idx >= 0,
        )


class TaskItems(torch.utils.data.Dataset):
    """Task items (index dicts); a list of positions is read as one :class:`TaskIndexBatch`."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, positions: list[int]) -> TaskIndexBatch:
        return TaskIndexBatch.collate([self.items[i] for i in positions])


@dataclass
class TaskBatch:
    """A batch of B tasks with their features; ``*_mask`` marks the real (unpadded) entries."""

    task: Tensor  # [B]
    question: Tensor  # [B, d_q] raw question embedding
    answers: Tensor  # [B, K, d] answer-prompt features
    answer_mask: Tensor  # [B, K]
    support_x: Tensor  # [B, S, d]
    support_y: Tensor  # [B, S]
    support_mask: Tensor  # [B, S]
    query_x: Tensor  # [B, Q, d]
    query_y: Tensor  # [B, Q]
    query_mask: Tensor  # [B, Q]

    def __len__(self) -> int:
        return self.task.shape[0]

    @property
    def device(self) -> torch.device:
        return self.task.device

    def select(self, idx: Tensor | slice) -> TaskBatch:
        """The tasks ``idx``, with padding trimmed to the longest selected task."""
        sub = TaskBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})
        return sub.trim()

    def trim(self) -> TaskBatch:
        """Drop padding columns that no task uses."""
        s, q = _extent(self.support_mask), _extent(self.query_mask)
        if s == self.support_mask.shape[1] and q == self.query_mask.shape[1]:
            return self
        return replace(
            self,
            support_x=self.support_x[:, :s],
            support_y=self.support_y[:, :s],
            support_mask=self.support_mask[:, :s],
            query_x=self.query_x[:, :q],
            query_y=self.query_y[:, :q],
            query_mask=self.query_mask[:, :q],
        )

    def chunked(
        self, size: int | None, by: Literal["all", "support"] = "all", max_padding: float = 1.5
    ) -> list[tuple[Tensor, TaskBatch]]:
        """``(indices, chunk)`` pairs: at most ``size`` tasks of similar size per chunk, each trimmed to
        its largest task (:func:`meta_vqa.meta.maml.plan_chunks`); ``by`` is the size that pads (support
        and query examples, or the support set alone when only the support set is used).

        Copies of sub-batches, for work that must see separate batches (``meta_gradient`` on a list, the
        benches' previous path); the planned steps use :meth:`examples` views instead."""
        n = self.support_mask.sum(1) + (self.query_mask.sum(1) if by == "all" else 0)
        groups = plan_chunks(n.tolist(), size, max_padding)
        if groups == [list(range(len(self)))]:  # one chunk in batch order: no copy needed
            return [(torch.arange(len(self), device=self.device), self.trim())]
        return [(idx, self.select(idx)) for idx in (torch.tensor(g, device=self.device) for g in groups)]

    def chunks(self, size: int | None, max_padding: float = 1.5) -> list[TaskBatch]:
        """The chunks of :meth:`chunked` by support and query size, without their indices."""
        return [chunk for _, chunk in self.chunked(size, "all", max_padding)]

    def subsample(
        self, max_support: int | None, max_query: int | None, generator: torch.Generator | None = None
    ) -> TaskBatch:
        """At most ``max_support`` / ``max_query`` random valid examples per task (None = keep all).

        A cheaper stochastic meta-training step on large tasks: each task keeps a uniform random subset,
        gathered into a narrower batch.
        """
        sx, sy, sm = _subsample(self.support_x, self.support_y, self.support_mask, max_support, generator)
        qx, qy, qm = _subsample(self.query_x, self.query_y, self.query_mask, max_query, generator)
        return replace(
            self, support_x=sx, support_y=sy, support_mask=sm, query_x=qx, query_y=qy, query_mask=qm
        )

    def split(self, which: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, mask)`` of ``"support"``, ``"query"`` or ``"all"`` (support and query concatenated)."""
        if which == "support":
            return self.support_x, self.support_y, self.support_mask
        if which == "query":
            return self.query_x, self.query_y, self.query_mask
        if which == "all":
            return (
                torch.cat([self.support_x, self.query_x], 1),
                torch.cat([self.support_y, self.query_y], 1),
                torch.cat([self.support_mask, self.query_mask], 1),
            )
        raise ValueError(f"unknown split {which!r}; expected 'support', 'query' or 'all'")

    def sizes(self, which: Split) -> Tensor:
        """Examples per task ``[B]`` in the split ``which``."""
        if which == "all":
            return self.support_mask.sum(1) + self.query_mask.sum(1)
        return self.split(which)[2].sum(1)

    def examples(self, which: Split, rows: Rows) -> Examples:
        """The split ``which`` of the tasks ``rows``, each task's examples at the front, trimmed to the
        largest task before anything is gathered (views where ``rows`` is a slice and the mask already is
        front-packed). ``"all"``: each task's support and query examples together."""
        answer_mask = self.answer_mask[rows]
        k = _extent(answer_mask)
        answers, answer_mask = self.answers[:, :k][rows], answer_mask[:, :k]
        xs, ys, ms = [], [], []
        for split in ("support", "query") if which == "all" else (which,):
            x, y, mask = self.split(split)
            mask = mask[rows]
            width = _extent(mask)
            xs.append(x[:, :width][rows])
            ys.append(y[:, :width][rows])
            ms.append(mask[:, :width])
        x, y, mask = (torch.cat(t, 1) if len(t) > 1 else t[0] for t in (xs, ys, ms))
        counts = mask.sum(1, keepdim=True)
        n = max(int(counts.max()), 1) if counts.numel() else 1
        if torch.equal(torch.arange(mask.shape[1], device=mask.device) < counts, mask):
            return Examples(answers, answer_mask, x[:, :n], y[:, :n], mask[:, :n])
        return Examples(answers, answer_mask, *pack(x, y, mask))

    def clone(self) -> TaskBatch:
        """A copy whose tensors are ordinary (not inference-mode) tensors, so they can enter autograd."""
        return TaskBatch(**{f.name: getattr(self, f.name).clone() for f in fields(self)})
