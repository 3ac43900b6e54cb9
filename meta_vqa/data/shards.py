"""Global batches split over DDP ranks: the samplers of the training and adaptation loaders.

``data.batch_size`` is the size of the **global** batch: the tasks (or adaptation latents) of one optimiser
step over all processes. Each of N ranks takes a contiguous share of every global batch (shares differ by
at most one row, the first ranks take the larger ones), so the shares concatenated in rank order are the
batch one process draws. With the loss weighting of :mod:`meta_vqa.stages.distributed` (a rank's sum is
divided by ``total / N`` before DDP averages the gradients) a step of N processes is the step of one
process on the whole batch, and the same YAML means the same training on any number of devices.

The samplers subclass :class:`~torch.utils.data.DistributedSampler` because they shard themselves: Lightning
injects its own sampler only into loaders that have none, so these loaders are left alone whatever
``trainer.use_distributed_sampler`` says, and no YAML has to remember a flag. Each sampler yields whole
batches (lists of indices) for a ``DataLoader(batch_size=None)`` whose dataset reads a list at once; the
adaptation latents' sampler is :class:`meta_vqa.data.latents.EpochBatches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from meta_vqa.errors import ConfigError


def share(n: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch of ``n``: contiguous, the first ``n % world`` ranks one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def share_sizes(n: int, world: int) -> list[int]:
    """Rows of every rank (see :func:`share`)."""
    return [(s := share(n, r, world)).stop - s.start for r in range(world)]


class ShardedSampler(DistributedSampler):
    """Base of the samplers that split work over ranks themselves (see the module docstring).

    ``DistributedSampler.__init__`` is not called: it wants a dataset and an initialised process group,
    and these samplers are also built outside a Trainer (rank 0 of 1). Lightning only reads the class,
    ``num_replicas``, ``rank`` and calls :meth:`set_epoch`.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.num_replicas, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _check_batch(self, batch_size: int, key: str = "data.batch_size") -> None:
        if batch_size < self.num_replicas:
            raise ConfigError(
                f"{key}: a global batch of {batch_size} cannot give each of {self.num_replicas} processes "
                "a share; use at least one row per process"
            )


def _shared_seed(world: int) -> int:
    """One draw of the global torch RNG, as :class:`~torch.utils.data.RandomSampler` makes per pass; under
    DDP rank 0's draw, so that every rank cuts the same permutation."""
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    if world > 1 and dist.is_available() and dist.is_initialized():
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


class TaskBatches(ShardedSampler):
    """Shuffled global batches of task positions ``range(n)``, the last one smaller; each rank its share.

    On one process this is exactly ``DataLoader(shuffle=True, batch_size=B)``: one seed drawn from the
    global torch RNG per pass, a ``randperm`` from it, batches in order, the remainder kept (``drop_last``:
    dropped, as ``DataLoader(shuffle=True, drop_last=True)`` does). Under DDP rank
    0's seed is broadcast; a last batch with fewer tasks than ranks leaves some ranks an empty share (they
    take part in the step with a zero gradient).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        super().__init__(rank, world)
        self._check_batch(batch_size)
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        seed = _shared_seed(self.num_replicas)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        for b in range(len(self)):
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[share(len(batch), self.rank, self.num_replicas)]


class EvalBatches(ShardedSampler):
    """One process's evaluation batches (positions in order, ``batch_size`` at a time, the last one smaller),
    dealt to the ranks in turn: batch ``b`` goes to rank ``b mod N`` (:func:`eval_batch_index` inverts it).

    Under DDP every batch is then evaluated exactly as one process evaluates it (the same tasks together,
    the same per-batch sampling seed), so test results equal one process's. A rank with fewer batches
    repeats its last one (or, without any, the last batch of all) so that every rank runs the same number
    of steps; results keep a task's first row, which is always the original's (rank order).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1):
        super().__init__(rank, world)
        batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, max(batch_size, 1))]
        mine = batches[rank::world]
        steps = -(-len(batches) // world)
        if batches and len(mine) < steps:
            mine += [mine[-1] if mine else batches[-1]] * (steps - len(mine))
        self.batches = mine

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def eval_batch_index(batch_idx: int, rank: int, world: int) -> int:
    """The position among one process's evaluation batches of a rank's ``batch_idx``-th batch (beyond the
    last for a repeat) under :class:`EvalBatches`."""
    return batch_idx * world + rank


def assign_jobs(sizes: Sequence[int], world: int) -> list[int]:
    """The rank of each job: largest first to the least loaded rank (ties: the lower rank), so every rank
    gets about the same number of tasks; deterministic, so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += sizes[j]
    return owner


class JobChunks(ShardedSampler):
    """Positions of the chunks whose job this rank owns (:func:`assign_jobs`), in order: whole jobs per
    rank, so a job is adapted and written by one process, and every job exactly once."""

    def __init__(self, chunk_jobs: Sequence[int], job_sizes: Sequence[int], rank: int = 0, world: int = 1):
        super().__init__(rank, world)
        owner = assign_jobs(job_sizes, world)
        self.positions = [i for i, j in enumerate(chunk_jobs) if owner[j] == rank]

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)
