"""Adaptation jobs: what ``predict`` iterates over to build the adaptation dataset (the authors'
"precompute adaptation" step).

A *job* is one set of tasks whose latents are adapted and written together:

* ``support_train``, ``support_val``, ``support_test``: every task of that set, adapted on its support
  split only (the evaluation files of the authors' precompute script);
* ``epoch_00000`` … : every meta-train task, adapted on a random subset of its whole data (support ∪
  query): ⌈N·f⌉ examples with f ~ U[min_fraction, 1), drawn per (seed, epoch, task).

Subsets depend only on ``(seed, epoch, task id)``, never on batching or on where an interrupted run
resumed, so a resumed run writes exactly what an uninterrupted one would have written.
Validation tasks are left out of the epochs: downstream stages select models on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from meta_vqa.data.batch import FeatureBank, TaskBatch, TaskIndexBatch

SUPPORT_SETS = ("train", "val", "test")


@dataclass(frozen=True)
class AdaptationRecipe:
    """How the adaptation dataset is made (the paper: 100 epochs, 10 SGD steps at lr 0.1, f ∈ [2/3, 1))."""

    epochs: int = 100
    min_fraction: float = 2 / 3
    steps: int = 10
    lr: float = 0.1
    seed: int = 42

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("epochs", "min_fraction", "steps", "lr", "seed")}


@dataclass(frozen=True)
class AdaptationJob:
    """One unit of work and of output: a task set, adapted either on support or on random subsets."""

    name: str
    kind: str  # "support" | "epoch"
    epoch: int  # -1 for support jobs
    items: tuple[int, ...]  # positions in the task set's item list
    source: str  # "train" | "val" | "test"


def epoch_job_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}"


def plan_jobs(n_tasks: dict[str, int], recipe: AdaptationRecipe) -> list[AdaptationJob]:
    """Support jobs for every task set, then one job per epoch over the meta-train tasks."""
    jobs = [AdaptationJob(f"support_{s}", "support", -1, tuple(range(n_tasks[s])), s) for s in SUPPORT_SETS]
    train = tuple(range(n_tasks["train"]))
    jobs += [AdaptationJob(epoch_job_name(e), "epoch", e, train, "train") for e in range(recipe.epochs)]
    return jobs


def subset_of(n: int, task: int, epoch: int, recipe: AdaptationRecipe) -> tuple[float, list[int]]:
    """``(f, kept positions)``: f ~ U[min_fraction, 1) and the first ⌈n·f⌉ of a permutation of range(n)."""
    rng = np.random.default_rng([recipe.seed, epoch, task])
    f = recipe.min_fraction + (1.0 - recipe.min_fraction) * float(rng.random())
    keep = min(n, max(1, math.ceil(n * f)))
    return f, sorted(rng.permutation(n)[:keep].tolist())


def subset_item(item: dict, epoch: int, recipe: AdaptationRecipe) -> tuple[dict, float]:
    """A task item whose support is a random subset of its support ∪ query (query left empty)."""
    images = item["support"] + item["query"]
    labels = item["support_y"] + item["query_y"]
    f, keep = subset_of(len(images), item["task"], epoch, recipe)
    sub = dict(
        item, support=[images[i] for i in keep], support_y=[labels[i] for i in keep], query=[], query_y=[]
    )
    return sub, f


@dataclass
class AdaptationIndexBatch:
    """A chunk of one job as index tensors; ``fraction`` is 1 for support jobs."""

    tasks: TaskIndexBatch
    job: str
    epoch: int
    fraction: Tensor  # [B]
    steps: int
    lr: float

    def gather(self, bank: FeatureBank) -> AdaptationBatch:
        return AdaptationBatch(
            self.tasks.gather(bank), self.job, self.epoch, self.fraction, self.steps, self.lr
        )


@dataclass
class AdaptationBatch:
    """A chunk of one job with its features: adapt every task's latent on ``tasks``' support split."""

    tasks: TaskBatch
    job: str
    epoch: int
    fraction: Tensor
    steps: int
    lr: float


class AdaptationChunks(torch.utils.data.Dataset):
    """The jobs cut into chunks of at most ``chunk`` tasks; each dataset item is one whole batch."""

    def __init__(
        self,
        jobs: list[AdaptationJob],
        items: dict[str, list[dict]],
        recipe: AdaptationRecipe,
        chunk: int,
    ):
        self.items = items
        self.recipe = recipe
        self.chunks = [
            (job, job.items[i : i + chunk]) for job in jobs for i in range(0, len(job.items), max(1, chunk))
        ]
        index = {job.name: j for j, job in enumerate(jobs)}
        self.job_of_chunk = [index[job.name] for job, _ in self.chunks]  # position in ``jobs``

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> AdaptationIndexBatch:
        job, positions = self.chunks[i]
        rows, fractions = [], []
        for p in positions:
            item = self.items[job.source][p]
            if job.kind == "epoch":
                item, f = subset_item(item, job.epoch, self.recipe)
            else:
                f = 1.0
            rows.append(item)
            fractions.append(f)
        return AdaptationIndexBatch(
            TaskIndexBatch.collate(rows),
            job.name,
            job.epoch,
            torch.tensor(fractions, dtype=torch.float32),
            self.recipe.steps,
            self.recipe.lr,
        )


def first_item(items: list[AdaptationIndexBatch]) -> AdaptationIndexBatch:
    """Collate for a loader with ``batch_size=1`` over :class:`AdaptationChunks` (items are whole batches)."""
    return items[0]
