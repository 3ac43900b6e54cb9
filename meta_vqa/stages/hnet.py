"""HNet-MAML: the paper's unconditional generative hypernetwork (the authors' ``inner_param=enet``).

A hypernetwork G_θ (MLP latent → 128 → 128 → 128 → D, the authors' init) maps a latent z to the adapter's
flat weights; a learned start latent z0 ~ N(0, I) and θ are meta-learned with MAML over the latent only:
the inner loop (10 GD steps, lr 0.1) adapts z per task, batched over tasks; θ and z0 get the outer
gradient. First-order by default (``first_order: false`` for second-order).

Choices: the meta-gradient is the plain mean over the meta-batch, gradients are clipped before the
optimiser step, and the inner loop uses the support split with the outer loss on the query split
(``inner_split: query`` / ``outer_split: support`` give the authors' reversed direction).

Conditional HNet-MAML (``condition: question``, method ``cond_hnet_maml``): a baseline of the paper's TMLR
appendix that the authors' code does not include. Here the start latent of a task is z0 + f(e_q), f a small
MLP on the task's raw question embedding, meta-learned with θ and z0; f's output layer starts at zero, so
training starts exactly from HNet-MAML. :meth:`HNetStage.start_latents` is the one place a task's start
latent is made: meta-training, validation, the test protocol and ``predict`` all begin there. The later
stages (HVAE, HyperCLIP, HyperLDM) take the unconditional HNet only.

Zero-shot = G_θ(start latent); few-shot = the start latent fine-tuned on support. ``predict`` adapts it on
the support split of every task of its batch; with ``data.predict_split: adaptation`` and the
:class:`~meta_vqa.stages.adaptation_writer.AdaptationWriter` it writes the adaptation dataset (the
authors' "precompute adaptation" step). The stage is a :class:`~meta_vqa.stages.generator.LatentGenerator`
for later stages.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.batch import TaskBatch
from meta_vqa.errors import ConfigError
from meta_vqa.eval.methods import COND_HNET_MAML, HNET_MAML
from meta_vqa.eval.protocol import Protocol
from meta_vqa.meta.maml import InnerLoop, MetaStepStats, Split
from meta_vqa.nets.adapter import ResidualAdapter
from meta_vqa.nets.hypernet import MLP
from meta_vqa.stages.common import grad_enabled
from meta_vqa.stages.generator import AdaptationSource, LatentGenerator, TrainingLatents
from meta_vqa.stages.meta_learning import MetaLearningStage, work_budget


class HNetStage(LatentGenerator, MetaLearningStage):
    """Hypernetwork + start latent meta-learned with MAML over the latent.

    Args:
        feature_dim: CLIP feature width (linked from the data).
        question_dim: question-embedding width (linked from the data; used with ``condition: question``).
        condition: ``none`` (HNet-MAML, the paper's unconditional model) or ``question`` (Conditional
            HNet-MAML: the start latent z0 + f(question), f an MLP whose output layer starts at zero).
        cond_hidden: hidden widths of f.
        adapter_hidden: the adapter's hidden width (256 in the paper: D = 394,240).
        latent_dim: size of the latent z (128).
        hnet_hidden: hidden widths of G_θ (128, 128, 128).
        inner_steps, inner_lr: the inner loop of meta-training (10 GD steps, lr 0.1).
        first_order: first-order MAML (the paper) or second-order.
        inner_split: inner-loop data in meta-training.
        outer_split: data of the outer loss.
        max_chunk_mib: memory budget of one batched pass in MiB: the tasks of a batch go through the
            shared layers together up to it, the adapter runs per bucket of tasks of similar size
            (None: no bound).
        chunk_size: deprecated; caps the tasks per adapter bucket (use ``max_chunk_mib``).
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
        condition: Literal["none", "question"] = "none",
        cond_hidden: tuple[int, ...] = (128,),
        inner_steps: int = 10,
        inner_lr: float = 0.1,
        first_order: bool = True,
        inner_split: Literal["support", "query"] = "support",
        outer_split: Split = "query",
        max_chunk_mib: float | None = 1024.0,
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
        if condition not in ("none", "question"):
            raise ConfigError(f"model.init_args.condition: {condition!r} is not one of none, question")
        conditional = condition == "question"
        self.method = COND_HNET_MAML if conditional else HNET_MAML
        self.title = "Conditional HNet-MAML" if conditional else "HNet-MAML"
        self.outer_split = outer_split
        self.optimizer_factory = optimizer
        self.adapter = ResidualAdapter(feature_dim, adapter_hidden)
        self.hnet = MLP(latent_dim, list(hnet_hidden), self.adapter.num_params)
        self.z0 = nn.Parameter(torch.randn(latent_dim))
        self.cond = MLP(question_dim, list(cond_hidden), latent_dim) if conditional else None
        if self.cond is not None:  # f = 0 at the start: training begins exactly at HNet-MAML
            nn.init.zeros_(self.cond.layers[-1].weight)
        self.train_loop = InnerLoop(inner_steps, inner_lr, first_order)
        self.budget = work_budget(max_chunk_mib, chunk_size)
        self.protocol = Protocol(
            InnerLoop(eval_steps, eval_lr, True), max_shots, True, eval_seed, self.budget
        )
        self.val_metrics = nn.ModuleDict(
            {k: MeanMetric() for k in ("acc_zero_shot", "acc_few_shot", "latent_norm", "latent_shift")}
        )

    # --- the latent-generator interface used by later stages -----------------------------------------
    kind = "hnet"

    @property
    def latent_dim(self) -> int:
        return self.z0.shape[0]

    @property
    def eval_loop(self) -> InnerLoop:
        return self.protocol.loop

    def weights(self, z: Tensor) -> Tensor:
        """Adapter weights ``[B, D]`` of latents ``[B, d]``."""
        return self.hnet(z)

    @property
    def conditional(self) -> bool:
        return self.cond is not None

    def init_latents(self, task: Tensor) -> Tensor:
        """The unconditional start latent of every task: z0 (graph to it kept)."""
        return self.z0.expand(task.shape[0], -1)

    def start_latents(self, batch: TaskBatch) -> Tensor:
        """Each task's start latent (graph to the meta-parameters kept): z0, or z0 + f(question) for
        Conditional HNet-MAML. Meta-training, validation, the test protocol and ``predict`` start here."""
        z = self.init_latents(batch.task)
        return z if self.cond is None else z + self.cond(batch.question.to(z.dtype))

    def weight_map(self):
        out = self.hnet.layers[-1]
        return self.hnet.features, out.weight, out.bias

    def from_adaptation(self, hnet_latents: Tensor) -> Tensor:
        return hnet_latents  # the adaptation dataset holds this generator's own latents

    def training_latents(self, latents: Tensor) -> TrainingLatents:
        return lambda batch, rows: batch.latent

    def adaptation_source(self, record: dict) -> AdaptationSource:
        return AdaptationSource(self.latent_dim, record.get("sha256"), record.get("path"))

    # --- meta-learning ---------------------------------------------------------------------------------
    def init_params(self, batch: TaskBatch) -> Tensor:
        return self.start_latents(batch)

    def to_weights(self, params: Tensor) -> Tensor:
        return self.weights(params)

    def log_train_extras(self, stats: MetaStepStats) -> None:
        self.log("train/z0_norm", self.z0.detach().norm(), batch_size=stats.tasks)
        self.log("train/latent_shift", stats.shift, batch_size=stats.tasks)

    # --- evaluation ----------------------------------------------------------------------------------
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            z0 = self.start_latents(b).detach()
            z = self.support_latents(b)
            values = {
                "acc_zero_shot": self.query_accuracy(z0, b),  # before adaptation
                "acc_few_shot": self.query_accuracy(z, b),  # after adaptation on the whole support set
                "latent_norm": z.norm(dim=-1),
                "latent_shift": (z - z0).norm(dim=-1),
            }
        for key, v in values.items():
            self.val_metrics[key].update(v)
            self.log(f"val/{key}", self.val_metrics[key], batch_size=len(batch))
        self.log("val/acc", self.val_metrics["acc_few_shot"], prog_bar=True, batch_size=len(batch))
