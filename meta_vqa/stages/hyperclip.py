"""HyperCLIP: a contrastive weight encoder and classifier guidance by latent optimisation (the paper's
HyperCLIP training and guidance).

Training: for each task of an adaptation epoch, the weights its adapted latent produces (HNet: G_θ(z);
HVAE: the VAE's reconstruction through a stochastic encoding, the authors' ``train_on_vae``) are
encoded by H_ω and matched against the normalised question embeddings with the symmetric InfoNCE loss
(features gathered across DDP ranks; temperature fixed at 1/100 or learned).

Zero-shot (guidance): starting from the generator's start latent, the latents of all test tasks are
optimised at once to maximise cos(H_ω(G(z)), e_q) (Adam, 50 steps, lr 1e-3; optional prior term and
Langevin noise). Few-shot starts from the guided latent. Diagnostic: 10-way task retrieval (a task's
support-adapted latent, made as the training latents are, scored against its own and 9 other tasks'
questions).
Method ids ``hnet_hyperclip`` / ``hvae_hyperclip`` with ``control`` aligned | shuffled | empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.latents import LatentBatch
from meta_vqa.diffusion.guidance import optimize_latents
from meta_vqa.eval.methods import Control
from meta_vqa.nets.weight_encoder import WeightEncoder, contrastive_loss
from meta_vqa.stages.common import grad_enabled
from meta_vqa.stages.distributed import global_batch, reduce_sum
from meta_vqa.stages.guidance import GuidanceStage, control_questions


class HyperCLIPStage(GuidanceStage):
    """Weight encoder trained contrastively against question embeddings; guided zero-shot latents.

    Args:
        upstream_ckpt: the generator's checkpoint (HNet-MAML or HVAE stage).
        upstream: the upstream record kept in this stage's checkpoint (leave unset).
        feature_dim, question_dim: linked from the data.
        hidden: hidden widths of the weight encoder (128, 128).
        scale: the contrastive logit scale (100); ``learn_scale`` trains it (clamped to [1, 100]).
        guidance_steps, guidance_lr: the latent optimisation (50 Adam steps, lr 1e-3).
        guidance_prior: λ of the (λ/2)·||z − z_init||² term (0 = off, the authors' default).
        langevin: Langevin noise scale ε_L (0 = off).
        cosine_lr: cosine learning-rate schedule over the guidance steps.
        controls: descriptions evaluated in ``test`` (aligned, shuffled, empty).
        retrieval_way: candidates of the retrieval diagnostic (10).
        max_shots, eval_seed: n-shot trials and their seed; fine-tuning uses the generator's loop.
        results_dir: where ``test`` writes results.json/.md.
        optimizer: Adam, lr 1e-3.
    """

    guidance, title = "hyperclip", "HyperCLIP"

    def __init__(
        self,
        upstream_ckpt: str | None = None,
        upstream: dict | None = None,
        feature_dim: int = 768,
        question_dim: int = 768,
        hidden: tuple[int, ...] = (128, 128),
        scale: float = 100.0,
        learn_scale: bool = False,
        guidance_steps: int = 50,
        guidance_lr: float = 1e-3,
        guidance_prior: float = 0.0,
        langevin: float = 0.0,
        cosine_lr: bool = False,
        controls: tuple[Control, ...] = ("aligned", "shuffled", "empty"),
        retrieval_way: int = 10,
        max_shots: int = 5,
        eval_seed: int = 42,
        results_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        gen = self.attach_generator(upstream_ckpt, upstream, feature_dim, max_shots, eval_seed)
        self.encoder = WeightEncoder(gen.adapter.num_params, question_dim, hidden, scale, learn_scale)
        keys = ("acc_zero_shot", "acc_start", "retrieval_acc", "loss")
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.retrieval = {"hits": 0.0, "n": 0}
        self.val_retrieval: float | None = None  # of the validation run a checkpoint was saved after

    # --- the classifier ------------------------------------------------------------------------------
    def similarity(self, w: Tensor, questions: Tensor) -> Tensor:
        """cos(H_ω(w), e_q) per row; a zero question (the null description) scores 0."""
        return (self.encoder(w) * F.normalize(questions, dim=-1)).sum(-1)

    def latent_encoder(self) -> Callable[[Tensor], Tensor]:
        """``z ↦ H_ω(G(z))`` (unit rows) for guidance. When the generator ends in an affine layer
        (:meth:`~meta_vqa.stages.generator.LatentGenerator.weight_map`), that layer and the encoder's
        first one are folded into one 128 × 128 map (the same function up to float reassociation), so
        a guidance step no longer reads the two 394,240-wide matrices per row and costs next to nothing;
        the fold is computed once per call (no gradient to the encoder through it)."""
        gen = self.generator
        wmap = gen.weight_map()
        if wmap is None:
            return lambda z: self.encoder(gen.weights(z))
        features, a, b = wmap
        mlp = self.encoder.mlp
        with torch.no_grad():
            m, c = mlp.fold_input(a, b)
        return lambda z: F.normalize(mlp.from_first(F.linear(features(z), m, c)), dim=-1)

    def guided_latents(self, task: Tensor, questions: Tensor, noise_rows: int | None = None) -> Tensor:
        """Zero-shot latents of the tasks, guided by their descriptions: the start latent optimised to
        maximise cos(H_ω(G(z)), e_q) (the paper's HyperCLIP guidance), all rows at once.

        ``noise_rows``: rows are stacked copies of a problem of that many rows (see :meth:`guided_controls`).
        """
        gen, hp = self.generator, self.hparams
        z_init = gen.init_latents(task).detach()
        g = torch.Generator(device=z_init.device).manual_seed(hp.eval_seed) if hp.langevin else None
        encode, q = self.latent_encoder(), F.normalize(questions, dim=-1)
        return optimize_latents(
            z_init,
            lambda z: (encode(z) * q).sum(-1),
            hp.guidance_steps,
            hp.guidance_lr,
            hp.guidance_prior,
            hp.langevin,
            hp.cosine_lr,
            g,
            noise_rows,
        )

    def guided_controls(self, batch: TaskBatch, controls: Sequence[Control] | None = None) -> dict:
        """``{control: guided latents [B, d]}``: the controls stacked along the task axis and guided in one
        optimisation (they are independent rows; Adam is elementwise), equal to one run per control."""
        controls = list(controls if controls is not None else self.hparams.controls)
        if not controls:
            return {}
        questions = torch.cat([control_questions(batch, c) for c in controls])
        z = self.guided_latents(batch.task.repeat(len(controls)), questions, noise_rows=len(batch))
        return dict(zip(controls, z.split(len(batch))))

    # --- training ------------------------------------------------------------------------------------
    def training_step(self, batch: LatentBatch, batch_idx: int) -> Tensor:
        rows = global_batch(self, len(batch))
        with torch.no_grad():
            w = self.generator.weights(self.training_latents(batch, rows))
        u = self.encoder(w)
        v = F.normalize(batch.question, dim=-1)
        # every rank scores its rows against the rows of all ranks (the one-process batch)
        loss = contrastive_loss(u, v, self.encoder.scale, sizes=rows.sizes)
        with torch.no_grad():
            acc = ((u @ v.T).argmax(1) == torch.arange(len(u), device=u.device)).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/batch_retrieval_acc", 100 * acc, batch_size=len(batch))
        self.log("train/scale", self.encoder.scale, batch_size=len(batch))
        return loss * rows.weight  # DDP's average over ranks is then the global batch's mean

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.encoder.parameters() if p.requires_grad])

    # --- evaluation ----------------------------------------------------------------------------------
    def retrieval_hits(self, batch: TaskBatch, candidates: Tensor) -> Tensor:
        """Per task: 1 if its support-adapted weights, made as the training latents are
        (:meth:`~meta_vqa.stages.generator.LatentGenerator.adapted_latents`), score its own question
        highest among ``way`` candidates (its own + random others from ``candidates`` [N, d_q]), else 0."""
        gen, way = self.generator, self.hparams.retrieval_way
        z = gen.adapted_latents(batch)
        with torch.no_grad():
            u = self.latent_encoder()(z)
            g = torch.Generator().manual_seed(self.hparams.eval_seed)
            hits = []
            for b in range(len(batch)):
                own = F.normalize(batch.question[b], dim=-1)
                others = F.normalize(candidates, dim=-1)
                others = others[(others - own).abs().sum(-1) > 1e-6]  # drop the task's own question
                pick = torch.randperm(len(others), generator=g)[: way - 1].to(others.device)
                scores = torch.cat([(u[b] * own).sum(-1, keepdim=True), others[pick] @ u[b]])
                hits.append(float(scores.argmax() == 0))
        return torch.tensor(hits, device=batch.device)

    def _candidates(self) -> Tensor:
        dm = self.trainer.datamodule
        return dm.bank(self.device).questions

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        gen = self.generator
        with grad_enabled(batch) as b:
            z = self.guided_latents(b.task, b.question)
            values = {
                "acc_zero_shot": gen.query_accuracy(z, b),
                "acc_start": gen.query_accuracy(gen.init_latents(b.task).detach(), b),
                "retrieval_acc": 100 * self.retrieval_hits(b, self._candidates()),
            }
        for key, v in values.items():
            self.val_metrics[key].update(v)
            self.log(f"val/{key}", self.val_metrics[key], batch_size=len(batch))
        self.log("val/acc", self.val_metrics["acc_zero_shot"], prog_bar=True, batch_size=len(batch))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        gen = self.generator
        with grad_enabled(batch) as b:
            for control, z in self.guided_controls(b).items():
                shots = None if control == "aligned" else [0]  # few-shot only for the real description
                res = self.protocol.evaluate(gen.adapter, b, z, gen.weights, shots=shots)
                self.record(batch, res, control, z if control == "aligned" else None)
            hits = self.retrieval_hits(b, self._candidates())
        self.retrieval["hits"] += hits.sum().item()
        self.retrieval["n"] += len(hits)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the validation retrieval the checkpoint was saved after, so that the test summary (from the best
        # checkpoint) can set the test tasks' retrieval beside it
        value = self.trainer.callback_metrics.get("val/retrieval_acc")
        if value is not None:
            checkpoint["val_retrieval_acc"] = float(value)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_retrieval = checkpoint.get("val_retrieval_acc")

    def test_epoch_summary(self) -> dict | None:
        hits, n = reduce_sum(self, self.retrieval["hits"]), reduce_sum(self, self.retrieval["n"])
        self.retrieval = {"hits": 0.0, "n": 0}
        if not n:
            return None
        acc = 100 * hits / n
        self.log("test/retrieval_acc", acc, rank_zero_only=True)
        way = self.hparams.retrieval_way
        summary = {
            "method": self.method,
            "retrieval_acc": acc,
            "retrieval_chance": 100 / way,
            "retrieval_way": way,
        }
        if self.val_retrieval is not None:
            summary["val_retrieval_acc"] = self.val_retrieval
        return summary
