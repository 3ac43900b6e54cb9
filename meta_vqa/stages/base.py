"""Base-model stage: the paper's baselines on the residual CLIP adapter.

Variants (``variant`` in YAML):

* ``clip_zero_shot``: w = 0, the adapter reduces to CLIP zero-shot classification (no training).
* ``uncond_multitask``: one weight vector trained on all meta-train tasks (no inner loop).
* ``cond_multitask``: a hypernetwork maps the raw question embedding to the weights, trained multitask.
* ``cond_multitask_film``: shared weights FiLM-modulated by the question (not in the authors' code).
* ``mnet_maml``: MAML on the adapter's own weights (first-order by default).

Zero-shot = the weights produced without support data; few-shot = those weights fine-tuned on support.
The meta-step is shared with HNet-MAML (:class:`~meta_vqa.stages.meta_learning.MetaLearningStage`): the
meta-gradient is the plain mean over the meta-batch and gradients are clipped before the optimiser step.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.batch import TaskBatch
from meta_vqa.errors import ConfigError
from meta_vqa.eval.methods import Variant
from meta_vqa.eval.protocol import Protocol
from meta_vqa.meta.maml import InnerLoop, Split
from meta_vqa.nets.adapter import ResidualAdapter
from meta_vqa.nets.hypernet import MLP, FiLMGenerator
from meta_vqa.stages.common import grad_enabled
from meta_vqa.stages.meta_learning import MetaLearningStage, work_budget


class BaseStage(MetaLearningStage):
    """Baselines on the residual adapter.

    Args:
        variant: which baseline (see module docstring).
        feature_dim: CLIP feature width (linked from the data).
        question_dim: question-embedding width (linked from the data).
        adapter_hidden: the adapter's hidden width (256 in the paper).
        hnet_hidden: hidden widths of the conditional hypernetwork (128, 128, 128 in the paper).
        film_hidden: hidden widths of the FiLM predictor.
        inner_steps: MAML inner steps during meta-training (``mnet_maml`` only).
        inner_lr: inner-loop learning rate.
        first_order: first-order MAML (the paper) or second-order.
        inner_split: inner-loop data in meta-training (``query`` = the authors' reversed direction).
        outer_split: data of the outer loss; default ``query`` for ``mnet_maml`` and ``all`` (support and
            query) for the multitask variants, which have no inner loop to hold the support set for.
        max_chunk_mib: memory budget of one batched pass in MiB: the tasks of a batch go through the
            shared layers together up to it, the adapter runs per bucket of tasks of similar size
            (None: no bound).
        chunk_size: deprecated; caps the tasks per adapter bucket (use ``max_chunk_mib``).
        max_train_examples: per meta-training step, use at most this many random support (and query)
            examples of each task (None = all, the paper's full-batch steps); a cheaper step on large tasks.
        grad_clip: max gradient norm, applied before the step (None = off).
        eval_steps, eval_lr: the fine-tuning loop of few-shot evaluation (10 GD steps, lr 0.1).
        max_shots: the n-shot trials run k = 1..max_shots examples per answer.
        eval_seed: seed of the n-shot subsets.
        results_dir: where ``test`` writes results.json/.md (default: the logger's folder).
        optimizer: the meta-optimiser (Adam, lr 1e-3 by default).
    """

    def __init__(
        self,
        variant: Variant = "mnet_maml",
        feature_dim: int = 768,
        question_dim: int = 768,
        adapter_hidden: int = 256,
        hnet_hidden: tuple[int, ...] = (128, 128, 128),
        film_hidden: tuple[int, ...] = (128,),
        inner_steps: int = 10,
        inner_lr: float = 0.1,
        first_order: bool = True,
        inner_split: Literal["support", "query"] = "support",
        outer_split: Split | None = None,
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
        self.variant = self.method = variant
        self.title = f"Base model: {variant}"
        self.optimizer_factory = optimizer
        self.adapter = ResidualAdapter(feature_dim, adapter_hidden)
        D = self.adapter.num_params
        if variant in ("uncond_multitask", "mnet_maml"):
            self.w0 = nn.Parameter(self.adapter.init_weights())
        elif variant == "cond_multitask":
            self.hnet = MLP(question_dim, list(hnet_hidden), D)
        elif variant == "cond_multitask_film":
            self.film = FiLMGenerator(self.adapter, question_dim, list(film_hidden))
        elif variant != "clip_zero_shot":
            raise ConfigError(f"model.variant: unknown variant {variant!r}")
        train_steps = inner_steps if variant == "mnet_maml" else 0
        self.train_loop = InnerLoop(train_steps, inner_lr, first_order)
        self.budget = work_budget(max_chunk_mib, chunk_size)
        self.protocol = Protocol(
            InnerLoop(eval_steps, eval_lr, True), max_shots, True, eval_seed, self.budget
        )
        self.outer_split = outer_split or ("query" if variant == "mnet_maml" else "all")
        self.select_on = "few_shot" if variant == "mnet_maml" else "zero_shot"
        self.val_acc = nn.ModuleDict({k: MeanMetric() for k in ("zero_shot", "few_shot")})

    # --- the weights each variant produces without support data --------------------------------------
    def init_params(self, batch: TaskBatch) -> Tensor:
        """Per-task zero-shot weights ``[B, D]`` (graph to the meta-parameters kept)."""
        B = len(batch)
        if self.variant == "clip_zero_shot":
            return torch.zeros(B, self.adapter.num_params, device=batch.device)
        if self.variant in ("uncond_multitask", "mnet_maml"):
            return self.w0.expand(B, -1)
        if self.variant == "cond_multitask":
            return self.hnet(batch.question)
        return self.film(batch.question)

    # --- evaluation ----------------------------------------------------------------------------------
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            res = self.protocol.evaluate(self.adapter, b, self.init_params(b), shots=[0, "full"])["model"]
        for key, shots in (("zero_shot", 0), ("few_shot", "full")):
            r = res[shots]
            self.val_acc[key].update(100 * r.correct / r.total.clamp(min=1))
        for key, metric in self.val_acc.items():
            self.log(f"val/acc_{key}", metric, batch_size=len(batch))
        self.log("val/acc", self.val_acc[self.select_on], prog_bar=True, batch_size=len(batch))

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> dict:
        """Zero-shot answers for the query examples: ``{"task", "pred", "label", "mask"}``."""
        with torch.no_grad():
            logits = self.adapter(self.init_params(batch), batch.query_x, batch.answers, batch.answer_mask)
        return {
            "task": batch.task,
            "pred": logits.argmax(-1),
            "label": batch.query_y,
            "mask": batch.query_mask,
        }
