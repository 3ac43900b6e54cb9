"""DDP semantics of the training steps: N processes make the optimiser step of one process on the whole batch.

The loaders give each rank a contiguous share of every global batch (:mod:`meta_vqa.data.shards`). What a
training step adds here:

* **Loss weighting.** DDP averages gradients over ranks. A rank's *sum* of per-row losses divided by
  ``total / N`` (:attr:`GlobalBatch.divisor`), averaged over N ranks, is the sum over the global batch
  divided by ``total``: the one-process mean, even when shares differ by a row. A per-rank *mean* is
  multiplied by :attr:`GlobalBatch.weight` (``n·N / total``; exactly 1 on one process).
* **Noise.** Every rank seeds its global torch RNG alike (``seed_everything``), so random draws for the
  global batch are the same on every rank; each rank keeps its own rows (:meth:`GlobalBatch.draw`). N
  processes then draw the noise one process would, no two ranks share noise, and a stream never repeats.
  :func:`sync_random_state` re-aligns the ranks' RNGs at every training epoch in case anything drew
  unevenly.
* **The stream one process draws.** Lightning re-seeds every DDP process when it sets up, after the model
  was built; one process is not re-seeded. :class:`RandomStateAfterConstruction` restores the state the
  (seeded) construction left, so a DDP run draws the task order and noise of a one-process run.
* **Rows of all ranks** (:func:`gather_rows`) for results written once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


@dataclass(frozen=True)
class GlobalBatch:
    """Where this rank's rows sit in the global batch of one step (every rank's rows, in rank order)."""

    sizes: tuple[int, ...]  # rows of every rank
    rank: int = 0

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def n(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def divisor(self) -> float:
        """Divide a per-rank sum by this: after DDP's average over ranks, the mean over the global batch."""
        return self.total / self.world

    @property
    def weight(self) -> float:
        """Multiply a per-rank mean by this (``n / divisor``; 1 on one process and for equal shares)."""
        return self.n * self.world / self.total

    def local(self, full: Tensor) -> Tensor:
        """This rank's rows of a tensor over the global batch."""
        return full[self.offset : self.offset + self.n]

    def draw(self, make: Callable[[int], Tensor]) -> Tensor:
        """``make(total)`` (a random draw for the whole global batch), this rank's rows kept."""
        return self.local(make(self.total))


def _trainer(module: L.LightningModule):
    return getattr(module, "_trainer", None)


def global_batch(module: L.LightningModule, n: int) -> GlobalBatch:
    """The global batch of which this rank holds ``n`` rows (one all-gather of the counts under DDP)."""
    trainer = _trainer(module)
    if trainer is None or trainer.world_size == 1:
        return GlobalBatch((n,))
    sizes = module.all_gather(torch.tensor(n, device=module.device)).reshape(-1).tolist()
    return GlobalBatch(tuple(int(s) for s in sizes), trainer.global_rank)


def sync_random_state(module: L.LightningModule) -> None:
    """Give every rank rank 0's torch RNG state (CPU and the module's CUDA device); nothing on one process.

    The ranks' streams only stay alike if every rank draws alike; this makes a slip (a draw sized by a
    rank's own rows) cost at most one epoch of correlated noise instead of the rest of the run."""
    trainer = _trainer(module)
    if trainer is None or trainer.world_size == 1:
        return
    cuda = module.device.type == "cuda"
    state = (torch.get_rng_state(), torch.cuda.get_rng_state(module.device) if cuda else None)
    cpu, dev = trainer.strategy.broadcast(state, src=0)
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state(dev, module.device)


def gather_rows(module: L.LightningModule, rows: Tensor) -> Tensor:
    """Concatenate every rank's ``[n_rank, c]`` rows (any n per rank) on every rank."""
    trainer = _trainer(module)
    if trainer is None or trainer.world_size == 1:
        return rows
    n = torch.tensor(rows.shape[0], device=module.device)
    counts = module.all_gather(n).reshape(-1)
    padded = rows.new_zeros(int(counts.max()), rows.shape[1])
    padded[: rows.shape[0]] = rows
    every = module.all_gather(padded.to(module.device)).reshape(len(counts), -1, rows.shape[1]).cpu()
    return torch.cat([every[i, : int(c)] for i, c in enumerate(counts)])


def reduce_sum(module: L.LightningModule, value: float) -> float:
    """The sum of a per-rank number over all ranks (the number itself on one process)."""
    trainer = _trainer(module)
    if trainer is None or trainer.world_size == 1:
        return value
    t = torch.tensor(float(value), device=module.device, dtype=torch.float64)
    return float(trainer.strategy.reduce(t, reduce_op="sum"))


class RandomStateAfterConstruction(Callback):
    """Restore, when a DDP run sets up, the host RNG states (torch CPU, numpy, Python) of the moment this
    callback was made: right after the seeded model was built (``meta-vqa fit`` adds it then).

    Lightning's DDP strategy re-seeds each process in ``setup_environment`` (``reset_seed``), which one
    process never does; without this, a DDP run would shuffle and draw noise from another point of the
    stream than one process. Every rank built the same model from the same seed, so every rank restores
    the same state. CUDA generators are untouched: construction runs on the CPU, so theirs are freshly
    seeded either way.
    """

    def __init__(self) -> None:
        self.state = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            cpu, numpy_state, python_state = self.state
            torch.set_rng_state(cpu)
            np.random.set_state(numpy_state)
            random.setstate(python_state)
