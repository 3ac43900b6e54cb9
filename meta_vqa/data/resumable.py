"""Loaders that a checkpoint can stop and continue in the middle of a pass, and that draw random numbers
only when a pass's first batch is asked for.

Lightning restores the loop counters of a resumed run (epoch, batch index) but restarts a plain
DataLoader's pass from its first batch, with a new shuffle: a run resumed mid-epoch would see other batches
than one never stopped. A :class:`ResumableLoader` has ``state_dict``/``load_state_dict``, which Lightning
saves into every checkpoint of ``fit`` and loads before it starts the training loader again; its batch
sampler (a :class:`ResumableBatches`) then repeats the interrupted pass's order and skips the batches
already trained on.

When the global generator is drawn from: a plain DataLoader draws its base seed from torch's global
generator each time it is iterated, and a shuffling sampler draws its seed when the pass's first batch is
asked for. A resumed Lightning run iterates loaders without taking a batch from them (to set the training
loop up, or to fast-forward a validation it will not repeat), which would shift every later number. Here
the loader has a generator of its own, and the sampler makes the loader's draw, then its own, when the
pass's first batch is asked for: the same draws, in the same order, as a plain DataLoader in a run never
stopped (whose numbers therefore do not change), and none from a pass nothing is taken from.
:class:`~meta_vqa.callbacks.LastCheckpoint` restores the saved random state before the first batch;
together they make a resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def _loader_seed_draw() -> None:
    """The draw a DataLoader without a generator of its own makes from the global one when iterated."""
    torch.empty((), dtype=torch.int64).random_()


class ResumableBatches(Sampler[list[int]]):
    """A batch sampler whose current pass can be saved and continued (see the module docstring).

    Subclasses say what identifies a pass (:meth:`pass_state`) and give its batches (:meth:`batches`,
    called with the saved identity when a pass is continued, with None when a new pass starts).
    """

    def __init__(self) -> None:
        self.done = 0  # batches of the current pass handed out
        self._resume: dict | None = None

    def pass_state(self) -> dict:
        return {}

    def batches(self, resume: dict | None) -> Iterator[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: nothing runs, and nothing is drawn, until the loader asks for the first batch
        resume, self._resume = self._resume, None
        if resume is None:
            _loader_seed_draw()  # a continued pass made its draws before the checkpoint
        skip = resume["done"] if resume is not None else 0
        self.done = skip
        for b, batch in enumerate(self.batches(resume["pass"] if resume is not None else None)):
            if b < skip:
                continue
            self.done = b + 1
            yield batch

    def state_dict(self) -> dict:
        return {"pass": self.pass_state(), "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        # a finished pass needs nothing: the next one starts afresh
        self._resume = state if 0 < state["done"] < len(self) else None


class OrderedBatches(ResumableBatches):
    """``BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False)``: items in order."""

    def __init__(self, n: int, batch_size: int):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self, resume: dict | None) -> Iterator[list[int]]:
        for i in range(0, self.n, self.batch_size):
            yield list(range(i, min(i + self.batch_size, self.n)))


class ShuffledBatches(OrderedBatches):
    """``BatchSampler(RandomSampler(range(n)), batch_size, drop_last=False)``, drawing exactly as it does
    (the pass's seed from torch's global generator when its first batch is asked for); a continued pass
    repeats its permutation from the saved seed without drawing."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(n, batch_size)
        self.seed: int | None = None

    def pass_state(self) -> dict:
        return {"seed": self.seed}

    def batches(self, resume: dict | None) -> Iterator[list[int]]:
        if resume is None:  # as RandomSampler without a generator
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        else:
            self.seed = resume["seed"]
        g = torch.Generator()
        g.manual_seed(self.seed)
        order = torch.randperm(self.n, generator=g).tolist()
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size]


class EpochResumable(ResumableBatches):
    """A batch sampler whose order depends only on its epoch (``set_epoch``, e.g.
    :class:`~meta_vqa.data.latents.EpochBatches`), made resumable: a pass is identified by its epoch.

    The wrapped sampler is deliberately not exposed as ``.sampler``: Lightning calls ``set_epoch`` on a
    loader's ``sampler`` and ``batch_sampler.sampler`` only, never on the batch sampler itself, so the
    wrapped sampler sees exactly the ``set_epoch`` calls it saw before it was wrapped.
    """

    def __init__(self, epoch_batches: Sampler[list[int]]):
        super().__init__()
        self.epoch_batches = epoch_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.epoch_batches)

    def pass_state(self) -> dict:
        return {"epoch": self.epoch}

    def batches(self, resume: dict | None) -> Iterator[list[int]]:
        if resume is not None:
            self.set_epoch(resume["epoch"])
        return iter(self.epoch_batches)


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableBatches` batch sampler (single process, ``num_workers=0``),
    with the ``state_dict`` interface Lightning saves and restores for training loaders. Its base seed comes
    from a generator of its own: iterating it draws nothing from the global one (the sampler makes that draw
    when the first batch is asked for)."""

    def __init__(self, dataset, batch_sampler: ResumableBatches, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, generator=torch.Generator(), **kwargs)

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
