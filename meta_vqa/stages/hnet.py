"""HNet-MAML: the unconditional generative hypernetwork of SPEC §4.1 (``inner_param=enet``).

A hypernetwork G_θ (MLP latent → 128 → 128 → 128 → D, the authors' init) maps a latent z to the adapter's
flat weights; a learned start latent z0 ~ N(0, I) and θ are meta-learned with MAML over the latent only:
the inner loop (10 GD steps, lr 0.1) adapts z per task, batched over tasks; θ and z0 get the outer
gradient. First-order by default (``first_order: false`` for second-order).

Choices (SPEC §9.1 items 3–4): the meta-gradient is the plain mean over the meta-batch, gradients are
clipped before the optimiser step, and the inner loop uses the support split with the outer loss on the
query split (``inner_split: query`` / ``outer_split: support`` give the authors' reversed direction).

Zero-shot = G_θ(z0); few-shot = z0 fine-tuned on support (SPEC §4.7). ``predict`` adapts z0 on the
support split of every task of its batch; with ``data.predict_split: adaptation`` and the
:class:`~meta_vqa.stages.adaptation_writer.AdaptationWriter` it writes the adaptation dataset (SPEC §4.2).
The stage is a *latent generator* for later stages: ``latent_dim``, ``adapter``, ``weights(z)``,
``init_latents(task)``, ``eval_loop`` (see :mod:`meta_vqa.stages.handoff`).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.adaptation import AdaptationBatch
from meta_vqa.data.batch import TaskBatch
from meta_vqa.eval.protocol import Protocol
from meta_vqa.eval.results import ResultCollector
from meta_vqa.meta.maml import InnerLoop, adapt
from meta_vqa.nets.adapter import ResidualAdapter, task_correct, task_losses
from meta_vqa.nets.hypernet import MLP
from meta_vqa.stages.common import finish_test, grad_enabled

METHOD = "hnet_maml"


class HNetStage(L.LightningModule):
    """Hypernetwork + start latent meta-learned with MAML over the latent.

    Args:
        feature_dim: CLIP feature width (linked from the data).
        question_dim: question-embedding width (linked from the data; unused: the HNet is unconditional).
        adapter_hidden: the adapter's hidden width (256 in the paper: D = 394,240).
        latent_dim: size of the latent z (128).
        hnet_hidden: hidden widths of G_θ (128, 128, 128).
        inner_steps, inner_lr: the inner loop of meta-training (10 GD steps, lr 0.1).
        first_order: first-order MAML (the paper) or second-order.
        inner_split: inner-loop data in meta-training.
        outer_split: data of the outer loss.
        chunk_size: tasks per inner-loop chunk (bounds memory; None = the whole meta-batch at once).
        max_train_examples: per meta-training step, use at most this many random support (and query)
            examples of each task (None = all, the paper's full-batch steps); a cheaper step on large tasks.
        grad_clip: max gradient norm, applied before the step (None = off).
        eval_steps, eval_lr: few-shot fine-tuning of the latent (10 SGD steps, lr 0.1).
        max_shots: the n-shot trials run k = 1..max_shots examples per answer.
        eval_seed: seed of the n-shot subsets.
        results_dir: where ``test`` writes results.json/.md (default: the logger's folder).
        optimizer: the meta-optimiser (Adam, lr 1e-3).
    """

    def __init__(
        self,
        feature_dim: int = 768,
        question_dim: int = 768,
        adapter_hidden: int = 256,
        latent_dim: int = 128,
        hnet_hidden: tuple[int, ...] = (128, 128, 128),
        inner_steps: int = 10,
        inner_lr: float = 0.1,
        first_order: bool = True,
        inner_split: Literal["support", "query"] = "support",
        outer_split: Literal["support", "query", "all"] = "query",
        chunk_size: int | None = None,
        max_train_examples: int | None = None,
        grad_clip: float | None = 10.0,
        eval_steps: int = 10,
        eval_lr: float = 0.1,
        max_shots: int = 5,
        eval_seed: int = 42,
        results_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.adapter = ResidualAdapter(feature_dim, adapter_hidden)
        self.hnet = MLP(latent_dim, list(hnet_hidden), self.adapter.num_params)
        self.z0 = nn.Parameter(torch.randn(latent_dim))
        self.train_loop = InnerLoop(inner_steps, inner_lr, first_order)
        self.protocol = Protocol(InnerLoop(eval_steps, eval_lr, True), max_shots, True, eval_seed)
        self.val_metrics = nn.ModuleDict(
            {k: MeanMetric() for k in ("acc_zero_shot", "acc_few_shot", "latent_norm", "latent_shift")}
        )
        self.collector = ResultCollector()

    # --- the latent-generator interface used by later stages -----------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.z0.shape[0]

    @property
    def eval_loop(self) -> InnerLoop:
        return self.protocol.loop

    def weights(self, z: Tensor) -> Tensor:
        """Adapter weights ``[B, D]`` of latents ``[B, d]``."""
        return self.hnet(z)

    def init_latents(self, task: Tensor) -> Tensor:
        """The zero-shot latent of every task: z0 (graph to it kept)."""
        return self.z0.expand(task.shape[0], -1)

    def adapt_latents(self, batch: TaskBatch, loop: InnerLoop | None = None) -> Tensor:
        """z0 fine-tuned on each task's support split ``[B, d]`` (detached), in the batch's task order.

        Runs in chunks of ``chunk_size`` tasks of similar support size (less padding per chunk).
        """
        loop = loop or self.eval_loop
        B, size = len(batch), self.hparams.chunk_size
        step = size if size and 0 < size < B else max(B, 1)
        order = batch.support_mask.sum(1).argsort()
        out = torch.empty(B, self.latent_dim, device=batch.device, dtype=self.z0.dtype)
        for i in range(0, B, step):
            idx = order[i : i + step]
            chunk = batch.select(idx)

            def inner_loss(z: Tensor, c: TaskBatch = chunk) -> Tensor:
                logits = self.adapter(self.weights(z), c.support_x, c.answers, c.answer_mask)
                return task_losses(logits, c.support_y, c.support_mask)

            out[idx] = adapt(self.init_latents(chunk.task), inner_loss, loop, track_meta_grad=False)
        return out

    # --- training ------------------------------------------------------------------------------------
    def _outer_losses(self, chunk: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-task outer losses, hits, counts and adapted latents of one chunk (graph to θ and z0)."""
        hp = self.hparams
        x, y, m = chunk.split(hp.inner_split)

        def inner_loss(z: Tensor) -> Tensor:
            return task_losses(self.adapter(self.weights(z), x, chunk.answers, chunk.answer_mask), y, m)

        z = adapt(self.init_latents(chunk.task), inner_loss, self.train_loop)
        x, y, m = chunk.split(hp.outer_split)
        logits = self.adapter(self.weights(z), x, chunk.answers, chunk.answer_mask)
        correct, total = task_correct(logits, y, m)
        return task_losses(logits, y, m), correct, total, z

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        B = len(batch)
        loss_sum, acc_sum, shift_sum = 0.0, 0.0, 0.0
        n = self.hparams.max_train_examples
        batch = batch.subsample(n, n) if n else batch
        for chunk in batch.chunks(self.hparams.chunk_size):
            losses, correct, total, z = self._outer_losses(chunk)
            self.manual_backward(losses.sum() / B)  # plain mean over the meta-batch (SPEC §9.1 item 3)
            loss_sum += losses.detach().sum()
            acc_sum += (correct / total.clamp(min=1)).sum()
            shift_sum += (z.detach() - self.z0.detach()).norm(dim=-1).sum()
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.log("train/loss", loss_sum / B, prog_bar=True, batch_size=B)
        self.log("train/acc", 100 * acc_sum / B, prog_bar=True, batch_size=B)
        self.log("train/z0_norm", self.z0.detach().norm(), batch_size=B)
        self.log("train/latent_shift", shift_sum / B, batch_size=B)
        return loss_sum / B

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    # --- evaluation ----------------------------------------------------------------------------------
    def _query_accuracy(self, z: Tensor, batch: TaskBatch) -> Tensor:
        with torch.no_grad():
            logits = self.adapter(self.weights(z), batch.query_x, batch.answers, batch.answer_mask)
        correct, total = task_correct(logits, batch.query_y, batch.query_mask)
        return 100 * correct / total.clamp(min=1)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            z0 = self.init_latents(b.task).detach()
            z = self.adapt_latents(b)
            values = {
                "acc_zero_shot": self._query_accuracy(z0, b),  # before adaptation
                "acc_few_shot": self._query_accuracy(z, b),  # after adaptation on the whole support set
                "latent_norm": z.norm(dim=-1),
                "latent_shift": (z - z0).norm(dim=-1),
            }
        for key, v in values.items():
            self.val_metrics[key].update(v)
            self.log(f"val/{key}", self.val_metrics[key], batch_size=len(batch))
        self.log("val/acc", self.val_metrics["acc_few_shot"], prog_bar=True, batch_size=len(batch))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            res = self.protocol.evaluate(
                self.adapter, b, self.init_latents(b.task).detach(), to_weights=self.weights
            )
        self.collector.add(METHOD, batch.task, res["model"])
        self.collector.add("chance", batch.task, res["chance"])
        self.collector.add("majority", batch.task, res["majority"])

    def on_test_epoch_end(self) -> None:
        finish_test(self, self.collector, self.hparams.results_dir, "HNet-MAML")

    def predict_step(self, batch: TaskBatch | AdaptationBatch, batch_idx: int) -> dict:
        """Latents adapted on each task's support split: ``{"task", "latent", "question"}``.

        An :class:`AdaptationBatch` (a job of the adaptation dataset) brings its own SGD loop; a plain
        task batch uses the few-shot loop.
        """
        if isinstance(batch, AdaptationBatch):
            tasks, loop = batch.tasks, InnerLoop(batch.steps, batch.lr, True)
        else:
            tasks, loop = batch, self.eval_loop
        with grad_enabled(tasks) as b:
            z = self.adapt_latents(b, loop)
        return {"task": tasks.task, "latent": z, "question": tasks.question}
