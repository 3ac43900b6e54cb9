"""What the meta-learned stages share: the MAML meta-step, the optimiser, and the test protocol.

:class:`~meta_vqa.stages.base.BaseStage` (the baselines on the adapter's own weights) and
:class:`~meta_vqa.stages.hnet.HNetStage` (a latent decoded by a hypernetwork) differ only in the
per-task parameters they start from (``init_params``) and in how parameters become adapter weights
(``to_weights``); the meta-step itself is :func:`meta_vqa.meta.maml.meta_gradient`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor

from meta_vqa.data.batch import TaskBatch
from meta_vqa.eval.protocol import Protocol
from meta_vqa.eval.results import ResultCollector
from meta_vqa.meta.maml import Budget, InnerLoop, MetaStepStats, Split, meta_gradient
from meta_vqa.nets.adapter import ResidualAdapter
from meta_vqa.stages.common import finish_test, global_seed, grad_enabled
from meta_vqa.stages.distributed import global_batch


def work_budget(max_chunk_mib: float | None, chunk_size: int | None) -> Budget:
    """The memory budget of the batched passes from a stage's settings; ``chunk_size`` (deprecated) still
    caps the tasks of one adapter bucket."""
    if chunk_size is not None:
        warnings.warn(
            "chunk_size is deprecated: the shared layers now take every task of a batch at once, up to "
            "the memory budget max_chunk_mib; chunk_size only caps the tasks per adapter bucket. "
            "Set max_chunk_mib (and chunk_size: null) instead.",
            FutureWarning,
            stacklevel=3,
        )
    return Budget(max_chunk_mib, max_tasks=chunk_size)


class MetaLearningStage(L.LightningModule):
    """A stage meta-trained with batched MAML (zero inner steps: multitask training).

    Subclasses set ``adapter``, ``train_loop``, ``protocol``, ``outer_split``, ``method`` and ``title``, and
    hold the hyper-parameters ``inner_split``, ``max_train_examples``, ``grad_clip`` and ``results_dir``
    and the memory budget ``budget`` of the batched passes; they implement :meth:`init_params` (and
    :meth:`to_weights` where the parameters are not weights).
    """

    adapter: ResidualAdapter
    train_loop: InnerLoop
    protocol: Protocol
    budget: Budget
    outer_split: Split
    method: str
    title: str

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.collector = ResultCollector()

    def init_params(self, batch: TaskBatch) -> Tensor:
        """Per-task zero-shot parameters ``[B, P]`` (graph to the meta-parameters kept)."""
        raise NotImplementedError

    def to_weights(self, params: Tensor) -> Tensor:
        """Flat adapter weights ``[B, D]`` of per-task parameters (identity: they are weights)."""
        return params

    # --- training ------------------------------------------------------------------------------------
    def meta_gradient(
        self,
        tasks: TaskBatch | Sequence[TaskBatch],
        backward: Callable[[Tensor], None] = Tensor.backward,
        divisor: float | None = None,
    ) -> MetaStepStats:
        """Accumulate the meta-gradient of a meta-batch, planned by the stage's memory budget (see
        :func:`meta_vqa.meta.maml.meta_gradient`; a list of batches: planned one by one); ``backward``
        carries each group's gradient back (a scalar whose gradient with respect to the group's weights is
        the outer-loss gradient)."""
        return meta_gradient(
            tasks,
            self.init_params,
            self.to_weights,
            self.adapter,
            self.train_loop,
            self.hparams.inner_split,
            self.outer_split,
            backward,
            self.budget,
            divisor,
            self._defer_sync(),
        )

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        hp = self.hparams
        opt = self.optimizers()
        opt.zero_grad()
        rows = global_batch(self, len(batch))  # this rank's share of the meta-batch (stages.distributed)
        if len(batch) == 0:  # a last meta-batch smaller than the ranks: no task here, a zero gradient
            self.manual_backward(sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad))
            opt.step()
            return None
        batch = batch.subsample(hp.max_train_examples, hp.max_train_examples, self._subsample_generator())
        # DDP averages the ranks' gradients in a backward pass: dividing each rank's sum by total / ranks
        # makes that average the mean over the whole meta-batch
        stats = self.meta_gradient(batch, self.manual_backward, rows.divisor)
        # the meta-loss goes to the callbacks that check losses (callbacks.StopOnNonFinite: a non-finite one
        # stops fit before the step); the backward passes above carried Σ w·∂L/∂w per group, not the loss
        for callback in self.trainer.callbacks:
            if callable(check_loss := getattr(callback, "check_loss", None)):
                check_loss(self.trainer, self, torch.as_tensor(stats.loss))
        opt.step()  # gradients are clipped in on_before_optimizer_step
        self.log("train/loss", stats.loss, prog_bar=True, batch_size=stats.tasks)
        self.log("train/acc", stats.accuracy, prog_bar=True, batch_size=stats.tasks)
        self.log_train_extras(stats)
        return stats.loss

    def _defer_sync(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        """Under DDP, the context that keeps a backward pass from all-reducing (the gradients of a
        meta-step's earlier groups accumulate locally; the last group's pass all-reduces them)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return getattr(trainer.strategy, "block_backward_sync", None)

    def on_before_optimizer_step(self, optimizer) -> None:
        # inside opt.step(), after a 16-mixed gradient scaler has unscaled the gradients (clipping the
        # scaled ones would clip nothing); before the step (the authors clipped after it, so it never acted)
        if self.hparams.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )

    def _subsample_generator(self) -> torch.Generator | None:
        """Under DDP each rank draws its example subsets from its own stream, seeded by (seed, step, rank);
        one process keeps the global RNG. (Subsets are drawn per rank, so DDP equals one process in
        distribution here, not draw for draw.)"""
        trainer = self._trainer
        if not self.hparams.max_train_examples or trainer is None or trainer.world_size == 1:
            return None
        seed = (global_seed() * 1_000_003 + self.global_step) * 10_007 + self.global_rank
        return torch.Generator().manual_seed(seed)

    def log_train_extras(self, stats: MetaStepStats) -> None:
        """Stage-specific training curves (nothing by default)."""

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if (
            self.hparams.grad_clip
            and scaler is not None
            and getattr(opt, "_step_supports_amp_scaling", False)
        ):
            # a fused optimizer unscales 16-mixed gradients inside its own step, so they cannot be clipped
            # before it (Lightning refuses): the same optimizer unfused, whose gradients the scaler unscales
            warnings.warn(
                f"{type(opt).__name__}(fused=True) cannot clip 16-mixed gradients (grad_clip "
                f"{self.hparams.grad_clip}): using it unfused",
                stacklevel=2,
            )
            opt = type(opt)(params, **{**opt.defaults, "fused": False})
        return opt

    # --- test: the evaluation protocol on the meta-test tasks -----------------------------------------
    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            res = self.protocol.evaluate(self.adapter, b, self.init_params(b).detach(), self.to_weights)
        self.collector.add_evaluation(self.method, batch.task, res)

    def on_test_epoch_end(self) -> None:
        finish_test(self, self.collector, self.hparams.results_dir, self.title)
