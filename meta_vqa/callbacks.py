"""Callbacks shared by every stage."""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel

from meta_vqa.errors import TrainingDiverged


def random_state(module: torch.nn.Module | None = None) -> dict:
    """The global random state (Python, NumPy, torch CPU and CUDA) and that of every ``torch.Generator``
    ``module`` holds as an attribute, as plain tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialised: nothing drawn yet
        state["cuda"] = torch.cuda.get_rng_state_all()
    if module is not None:
        gens = {k: g.get_state() for k, g in vars(module).items() if isinstance(g, torch.Generator)}
        if gens:
            state["generators"] = gens
    return state


def set_random_state(state: dict, module: torch.nn.Module | None = None) -> None:
    """Restore what :func:`random_state` returned."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (state.get("generators") or {}).items():
        if module is not None and isinstance(getattr(module, k, None), torch.Generator):
            getattr(module, k).set_state(g)


class StopOnNonFinite(Callback):
    """Stop ``fit`` at the first NaN or infinite loss or gradient, before the optimiser applies it.

    Every loss is checked (``on_before_backward`` for the automatic step's; the meta-learning stages hand
    their meta-loss to :meth:`check_loss` before stepping), and every gradient right before the optimiser step
    (``on_before_optimizer_step``, after clipping, for both kinds of optimisation). Raising there aborts
    the step, so the weights never take it, and no ``best.ckpt``/``last.ckpt`` or results
    (``--test_after_fit``) are made from it; the error names the stage and the step. Only NaN and ±inf
    count, so bf16 values are never false alarms. With a gradient scaler (``16-mixed``) an overflowing
    gradient is expected and the scaler skips that step itself, so gradients are not checked there; the
    loss still is.
    """

    @staticmethod
    def _stop(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        variant = getattr(pl_module, "variant", None)
        stage = type(pl_module).__name__ + (f" ({variant})" if variant else "")
        batch = trainer.fit_loop.epoch_loop.batch_idx
        raise TrainingDiverged(
            f"{stage}: {what} at training step {trainer.global_step + 1} (epoch {trainer.current_epoch}, "
            f"batch {batch}); fit stopped before applying the step, no checkpoint or result saved from it"
        )

    def check_loss(self, trainer, pl_module, loss: torch.Tensor) -> None:
        """Stop if ``loss`` is not finite (the meta-learning stages call this with their float32 meta-loss
        before stepping: their backward passes carry weights with explicit gradients, not a loss)."""
        values = loss.detach().float().flatten()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            self._stop(trainer, pl_module, f"the loss is {values[~finite][0].item()}")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Only a loss (one value) is checked here: a tensor handed back with its gradient
        # (``manual_backward(w, dL/dw)``) is not a loss (the meta-learning stages check theirs themselves).
        if loss.numel() == 1:
            self.check_loss(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        finite = torch.stack([torch.isfinite(p.grad).all() for p in params])
        if bool(finite.all()):
            return
        bad = params[int((~finite).nonzero()[0])]
        name = next((n for n, p in pl_module.named_parameters() if p is bad), "a parameter")
        self._stop(trainer, pl_module, f"the gradient of {name} is not finite")


class LastCheckpoint(Callback):
    """Keep ``last.ckpt`` equal to the newest training state, so a killed run resumes where it stopped, and
    ends with the same weights and results as a run never stopped.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k
    checkpoint is written; this callback writes it after every validation, every ``every_n_train_steps``
    steps (if set) and when training ends. The file is written beside the ``ModelCheckpoint``'s, to a
    temporary name first and then renamed, so a crash never leaves a truncated ``last.ckpt``.

    Reproducible resuming: Lightning restores the weights, optimiser and loop counters; the training loaders
    continue the interrupted pass in the same order (:mod:`meta_vqa.data.resumable`); this callback adds the
    random state (:func:`random_state`) to every checkpoint and restores it when training restarts
    (``on_train_start``: after the loaders are set up, before the first batch is drawn; the loaders make their
    own draws only when a pass's first batch is asked for). A step after which Lightning validates is saved
    after that validation (``on_validation_end``), not at the batch's end: resuming from the batch's end,
    Lightning would skip that validation; and it is saved after the ``ModelCheckpoint`` has handled that
    validation, so ``last.ckpt`` knows the ``best.ckpt`` it may have written.
    """

    def __init__(self, every_n_train_steps: int | None = None, filename: str = "last.ckpt"):
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self._saved_step = -1
        self._trainer: L.Trainer | None = None
        self._restore: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        # last in the hook order, after the ModelCheckpoint: last.ckpt then records the top-k checkpoint
        # of the validation it follows (a new list: the setup loop goes on over the old one)
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    # --- the random state in every checkpoint --------------------------------------------------------
    def state_dict(self) -> dict:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"random": random_state(trainer.lightning_module)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore = state_dict.get("random")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restore is not None:
            set_random_state(self._restore, pl_module)
            self._restore = None

    # --- when last.ckpt is written -------------------------------------------------------------------
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
        trainer.save_checkpoint(tmp, weights_only=False)  # the whole training state
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("last_checkpoint")
        self._saved_step = trainer.global_step

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether Lightning validates right after the current batch (its own test, where it has one)."""
        loop = trainer.fit_loop.epoch_loop
        check = getattr(loop, "_should_check_val_fx", None)
        if check is not None:
            try:
                return bool(check(trainer.fit_loop._data_fetcher))
            except (TypeError, AttributeError):
                pass
        return bool(loop.batch_progress.is_last_batch)  # unknown Lightning: validation may follow

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not self._validation_follows(trainer):
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
