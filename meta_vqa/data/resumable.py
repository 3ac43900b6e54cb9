"""Training loaders that a checkpoint can stop and continue in the middle of a pass, and that draw random
numbers only when a pass's first batch is asked for.

Lightning restores the loop counters of a resumed run (epoch, batch index) but restarts a plain
DataLoader's pass from its first batch, with a new shuffle: a run resumed mid-epoch would see other batches
than one never stopped. :func:`resumable` turns a loader into a :class:`ResumableLoader`, whose
``state_dict``/``load_state_dict`` Lightning saves into every checkpoint of ``fit`` and loads before it
starts the loader again. Its sampler (:class:`ResumablePasses`, around the loader's own) records, for the
current pass, torch's global random state at the pass's start and the batches handed out; a continued pass
replays the sampler from that state (the same shuffle: ``RandomSampler`` and the like draw their seed
from the global generator) and skips the batches already trained on.

When the global generator is drawn from: a plain DataLoader draws its base seed from it each time it is
iterated, a shuffling sampler when its first index is asked for. A resumed Lightning run iterates loaders
without taking a batch from them (to set the training loop up, or to fast-forward a validation it will not
repeat), which would shift every later number. A :class:`ResumableLoader` has a generator of its own, and
its sampler makes the loader's draw, then lets the wrapped sampler make its own, when the pass's first
batch is asked for: the same draws, in the same order, as the plain loader in a run never stopped (whose
numbers therefore do not change), and none for a pass nothing is taken from.
:class:`~meta_vqa.callbacks.LastCheckpoint` restores the saved random state before the first batch;
together they make a resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def _loader_seed_draw() -> None:
    """The draw a DataLoader without a generator of its own makes from the global one when iterated."""
    torch.empty((), dtype=torch.int64).random_()


class ResumablePasses(Sampler):
    """Wraps a loader's sampler or batch sampler whose pass depends only on torch's global random state at
    the pass's start and on its epoch (``RandomSampler``, ``BatchSampler``, the adaptation batches), so that
    a pass can be saved and continued (see the module docstring).

    The wrapped sampler is ``inner``, not ``sampler``: Lightning calls ``set_epoch`` on a loader's
    ``sampler`` and on its ``batch_sampler.sampler``, so a wrapped batch sampler sees exactly the calls it
    saw unwrapped.
    """

    def __init__(self, inner: Sampler):
        self.inner = inner
        self.done = 0  # items (batches) of the current pass handed out
        self._start: torch.Tensor | None = None  # global random state where the current pass began
        self._resume: dict | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        # a generator: nothing runs, and nothing is drawn, until the loader asks for the first item
        resume, self._resume = self._resume, None
        if resume is None:
            _loader_seed_draw()
            self._start = torch.get_rng_state()
            self.done = 0
            for item in self.inner:
                self.done += 1
                yield item
            return
        # the interrupted pass: the wrapped sampler replayed from where it began, its first items skipped;
        # then the random state goes back to the one restored for training
        now = torch.get_rng_state()
        torch.set_rng_state(resume["start"])
        self._start = resume["start"]
        items = iter(self.inner)
        for _ in range(resume["done"]):
            if next(items, None) is None:
                break
        torch.set_rng_state(now)
        self.done = resume["done"]
        for item in items:
            self.done += 1
            yield item

    def state_dict(self) -> dict:
        return {"start": self._start, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        # a finished (or not begun) pass needs nothing: the next one starts afresh
        ok = state.get("start") is not None and 0 < state.get("done", 0) < len(self)
        self._resume = state if ok else None


class ResumableLoader(DataLoader):
    """A single-process DataLoader (``num_workers=0``) over a :class:`ResumablePasses` sampler or batch
    sampler, with the ``state_dict`` interface Lightning saves and restores for training loaders. Its base
    seed comes from a generator of its own: iterating it draws nothing from the global one (its sampler
    makes that draw when the first batch is asked for)."""

    def __init__(self, *args, **kwargs):
        kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        passes = self.batch_sampler if isinstance(self.batch_sampler, ResumablePasses) else self.sampler
        if not isinstance(passes, ResumablePasses):
            raise TypeError("ResumableLoader needs a ResumablePasses sampler or batch sampler")
        self.passes = passes

    def state_dict(self) -> dict:
        return self.passes.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.passes.load_state_dict(state)


def resumable(loader: DataLoader) -> ResumableLoader:
    """The same loader (dataset, batches, collate function) made resumable; it draws the same numbers."""
    if loader.num_workers:
        raise ValueError("resumable loaders run in the main process (num_workers=0)")
    kwargs = {"collate_fn": loader.collate_fn, "num_workers": 0, "pin_memory": loader.pin_memory}
    if loader.batch_sampler is not None:  # batches of a (batch) sampler
        return ResumableLoader(loader.dataset, batch_sampler=ResumablePasses(loader.batch_sampler), **kwargs)
    return ResumableLoader(loader.dataset, sampler=ResumablePasses(loader.sampler), batch_size=None, **kwargs)
