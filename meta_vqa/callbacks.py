"""Callbacks shared by every stage."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel


class LastCheckpoint(Callback):
    """Keep ``last.ckpt`` equal to the newest training state, so a killed run resumes where it stopped.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k
    checkpoint is written; this callback writes it after every validation, every ``every_n_train_steps``
    steps (if set) and when training ends. The file is written beside the ``ModelCheckpoint``'s, to a
    temporary name first and then renamed, so a crash never leaves a truncated ``last.ckpt``.
    """

    def __init__(self, every_n_train_steps: int | None = None, filename: str = "last.ckpt"):
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self._saved_step = -1

    def _dir(self, trainer: L.Trainer) -> Path:
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            return Path(cb.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._saved_step == trainer.global_step:
            return
        path = self._dir(trainer) / self.filename
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("last_checkpoint")
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)


@contextlib.contextmanager
def _sharing_callables(module: torch.nn.Module) -> Iterator[None]:
    """While active, ``copy.deepcopy(module)`` shares the plain callables its (sub)modules hold."""
    shared = {
        id(v): v
        for m in module.modules()
        for v in vars(m).values()
        if callable(v) and not isinstance(v, torch.nn.Module | type)
    }

    def deepcopy_sharing(memo: dict) -> torch.nn.Module:
        memo.update(shared)
        del module.__deepcopy__  # copy the module itself the ordinary way
        try:
            return copy.deepcopy(module, memo)
        finally:
            module.__deepcopy__ = deepcopy_sharing

    module.__deepcopy__ = deepcopy_sharing
    try:
        yield
    finally:
        del module.__deepcopy__


class _TrainableAveragedModel(AveragedModel):
    """An :class:`AveragedModel` that averages only the parameters with ``requires_grad`` and keeps its
    buffers equal to the model's. Frozen parameters (a frozen upstream generator, a HyperCLIP) never
    change, so averaging them only costs time: on Meta-EasyVQA it made each HyperLDM step ~4x slower."""

    ema_decay: float | None = None  # set by :class:`EMA`: one fused lerp over all tensors per update

    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = [(a, p) for a, p in zip(self.module.parameters(), model.parameters()) if p.requires_grad]
        with torch.no_grad():
            avgs = [a for a, _ in pairs]
            curs = [p.detach().to(a.device) for a, p in pairs]
            if self.n_averaged == 0:
                torch._foreach_copy_(avgs, curs)
            elif self.ema_decay is not None:  # decay·avg + (1 − decay)·cur, as get_ema_avg_fn
                torch._foreach_lerp_(avgs, curs, 1.0 - self.ema_decay)
            else:
                for avg, cur in zip(avgs, curs):
                    avg.copy_(self.avg_fn(avg, cur, self.n_averaged.to(avg.device)))
            for b_avg, b in zip(self.module.buffers(), model.buffers()):
                b_avg.copy_(b.detach().to(b_avg.device))
        self.n_averaged += 1


class EMA(EMAWeightAveraging):
    """Lightning's :class:`EMAWeightAveraging` (same arguments, same checkpoint format) over the trainable
    parameters only; frozen parameters and buffers are copied from the model.

    The averaged copy is a deep copy of the module's tensors and submodules only: plain callables the
    module holds (an optimizer factory from the CLI, a training-latent sampler) are shared, not copied.
    A CLI optimizer factory reaches the Trainer, and under DDP its launcher's subprocesses, which cannot
    be copied (``cannot pickle '_thread.lock'``); on one process copying them only cost memory.
    """

    def __init__(self, *args, decay: float = 0.999, **kwargs):
        super().__init__(*args, decay=decay, **kwargs)
        self._decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with _sharing_callables(pl_module):
            super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            self._average_model.__class__ = _TrainableAveragedModel
            self._average_model.ema_decay = self._decay
