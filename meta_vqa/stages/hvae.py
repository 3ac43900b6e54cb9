"""HVAE: a VAE over task-adapted adapter weights (the paper's HVAE), on top of a frozen HNet-MAML stage.

Training data: the adaptation dataset's latents (``data.adaptation``), one random adaptation epoch per
training epoch in batches of 32 tasks (leftovers dropped), decoded to weights w = G_θ(z) by the frozen
HNet on the fly. Loss: √D-scaled reconstruction + β·KL/√D (:func:`meta_vqa.nets.vae.vae_loss`), in
standardised weight space with ``normalize: true`` (the authors' option).

Evaluation: the zero-shot latent is the encoding of the HNet's initial weights G_θ(z0): its mean μ by
default (``init_latent: mean``, deterministic), or a sample of q(z | G_θ(z0)) drawn per task from (seed,
eval_seed, task id) (``init_latent: sample``, the authors' choice; their precompute route drew one sample
for all tasks, we draw one per task); few-shot = that latent fine-tuned on support with 50 Adam steps at
lr 1e-3 (the authors' values).
Reconstruction accuracy: HNet latents adapted on support → weights → encode (μ) → decode → query
accuracy (``val/recon_acc``; in ``test`` the ``hvae_recon`` record, shots ``full``).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.latents import LatentBatch
from meta_vqa.errors import DataError
from meta_vqa.eval.methods import HVAE, HVAE_RECON
from meta_vqa.eval.protocol import Protocol, ShotResult, query_hits
from meta_vqa.eval.results import ResultCollector
from meta_vqa.meta.maml import InnerLoop
from meta_vqa.nets.adapter import ResidualAdapter
from meta_vqa.nets.vae import WeightVAE, vae_loss
from meta_vqa.stages.common import finish_test, global_seed, grad_enabled
from meta_vqa.stages.distributed import GlobalBatch, global_batch, sync_random_state
from meta_vqa.stages.generator import (
    AdaptationSource,
    LatentGenerator,
    TrainingLatents,
    require_unconditional,
)
from meta_vqa.stages.handoff import attach_upstream, check_adaptation
from meta_vqa.stages.hnet import HNetStage

VAL_KEYS = ("acc_zero_shot", "acc_few_shot", "recon_acc", "recon_source_acc", "loss", "rec", "kl", "mu_norm")


class HVAEStage(LatentGenerator, L.LightningModule):
    """VAE over the weights a frozen HNet-MAML generates for task-adapted latents.

    Args:
        upstream_ckpt: the HNet-MAML checkpoint (read once when training starts; never when restoring).
        upstream: the upstream record saved in this stage's own checkpoint (leave unset; see
            :mod:`meta_vqa.stages.handoff`).
        feature_dim, question_dim: linked from the data; ``feature_dim`` must match the HNet's.
        latent_dim: VAE latent size (128).
        hidden: encoder hidden widths (128, 128); the decoder mirrors them.
        beta: KL weight (1).
        normalize: standardise the weights the VAE sees with their per-dimension mean and one scalar
            std (the mean of the per-dimension stds) over one adaptation epoch, computed when training
            starts and kept in the checkpoint (the authors' ``normalize`` option; off by default). Helps
            when tasks differ little relative to the weights' scale.
        init_latent: zero-shot latent: ``mean`` (μ of q(z | G_θ(z0))) or ``sample`` (one draw per task).
        select_on: what ``val/acc`` (the checkpoint monitor) reports: ``recon`` (reconstruction accuracy
            of support-adapted HNet weights, the VAE's own job) or ``few_shot``.
        eval_steps, eval_lr: few-shot fine-tuning of the VAE latent with Adam (50 steps, lr 1e-3).
        max_shots, eval_seed: n-shot trials k = 1..max_shots and the seed of their subsets.
        results_dir: where ``test`` writes results.json/.md (default: the logger's folder).
        optimizer: Adam, lr 1e-4.
    """

    def __init__(
        self,
        upstream_ckpt: str | None = None,
        upstream: dict | None = None,
        feature_dim: int = 768,
        question_dim: int = 768,
        latent_dim: int = 128,
        hidden: tuple[int, ...] = (128, 128),
        beta: float = 1.0,
        normalize: bool = False,
        init_latent: Literal["mean", "sample"] = "mean",
        select_on: Literal["recon", "few_shot"] = "recon",
        eval_steps: int = 50,
        eval_lr: float = 1e-3,
        max_shots: int = 5,
        eval_seed: int = 42,
        results_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.upstream, record = attach_upstream(upstream_ckpt, upstream, expected=(HNetStage,))
        self.hparams["upstream"] = record
        require_unconditional(self.hnet, f"model.upstream_ckpt {record.get('path')}")
        if self.hnet.adapter.dim != feature_dim:
            raise DataError(
                f"{record.get('path')}: the HNet was trained on {self.hnet.adapter.dim}-d features, "
                f"but the data has {feature_dim}-d features"
            )
        self.vae = WeightVAE(self.adapter.num_params, latent_dim, hidden)
        self.register_buffer("w_mean", torch.zeros(self.adapter.num_params))
        self.register_buffer("w_scale", torch.tensor(0.0))  # 0 = not computed yet
        self.protocol = Protocol(InnerLoop(eval_steps, eval_lr, True, "adam"), max_shots, True, eval_seed)
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in VAL_KEYS})
        self.collector = ResultCollector()

    @property
    def hnet(self) -> HNetStage:
        return self.upstream.module

    # --- the latent-generator interface used by later stages -----------------------------------------
    kind = "hvae"

    @property
    def adapter(self) -> ResidualAdapter:
        return self.hnet.adapter

    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    @property
    def eval_loop(self) -> InnerLoop:
        return self.protocol.loop

    def weights(self, z: Tensor) -> Tensor:
        return self.from_vae(self.vae.decode(z))

    def weight_map(self):
        dec, out = self.vae.decoder, self.vae.decoder.layers[-1]
        if not self.hparams.normalize:
            return dec.features, out.weight, out.bias
        # from_vae(h aᵀ + b) = (s·h) aᵀ + (s·b + mean): the scale moves to the features
        return lambda z: dec.features(z) * self.w_scale, out.weight, out.bias * self.w_scale + self.w_mean

    @torch.no_grad()
    def posterior(self, hnet_latents: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)`` of q(z | G_θ(z_hnet)) for HNet latents ``[N, d_hnet]``."""
        return self.vae.encode(self.to_vae(self.hnet.weights(hnet_latents)))

    @torch.no_grad()
    def from_adaptation(self, hnet_latents: Tensor) -> Tensor:
        """A draw of z ~ q(z | G_θ(z_hnet)) per HNet latent (the authors' ``train_on_vae`` route)."""
        return self.vae.sample(*self.posterior(hnet_latents))

    def adapted_latents(self, batch: TaskBatch) -> Tensor:
        """A draw of q(z | G_θ(z_τ)) for the HNet's support-adapted latents z_τ: what the guidance stages
        train on. (The HVAE's own few-shot loop from its start latent is another thing: at the paper's
        step size it barely moves, so every task would look alike.)"""
        return self.from_adaptation(self.hnet.support_latents(batch))

    @torch.no_grad()
    def training_latents(self, latents: Tensor, chunk: int = 1024) -> TrainingLatents:
        """Each use draws a fresh z ~ q(z | G_θ(z_hnet)). The posterior of every dataset latent is
        computed once here and a batch only samples from it: the same distribution as re-encoding the
        batch's weights every step, at a small fraction of the cost."""
        flat = latents.flatten(0, 1)
        parts = [self.posterior(c.to(self.device).float()) for c in flat.split(chunk)]
        mu = torch.cat([m for m, _ in parts])
        logvar = torch.cat([lv for _, lv in parts])

        def sample(batch: LatentBatch, rows: GlobalBatch) -> Tensor:
            if batch.index is None:
                return self.from_adaptation(batch.latent)
            idx = batch.index.to(mu.device)
            eps = rows.draw(lambda n: torch.randn(n, mu.shape[1], device=mu.device, dtype=mu.dtype))
            return self.vae.sample(mu[idx], logvar[idx], eps)

        return sample

    def adaptation_source(self, record: dict) -> AdaptationSource:
        rec = self.hparams.upstream  # the adaptation dataset holds latents of this HVAE's own HNet
        return AdaptationSource(self.hnet.latent_dim, rec.get("sha256"), rec.get("path"))

    # --- the space the VAE works in -------------------------------------------------------------------
    def to_vae(self, w: Tensor) -> Tensor:
        return (w - self.w_mean) / self.w_scale if self.hparams.normalize else w

    def from_vae(self, v: Tensor) -> Tensor:
        return v * self.w_scale + self.w_mean if self.hparams.normalize else v

    @torch.no_grad()
    def fit_normalizer(self, latents: Tensor, chunk: int = 256) -> None:
        """Per-dimension mean and the mean per-dimension std of G_θ(latents) ``[T, d]`` (two passes)."""
        lat = latents.to(self.w_mean.device, self.w_mean.dtype)
        total = torch.zeros_like(self.w_mean)
        for i in range(0, len(lat), chunk):
            total += self.hnet.weights(lat[i : i + chunk]).sum(0)
        mean = total / len(lat)
        sq = torch.zeros_like(self.w_mean)
        for i in range(0, len(lat), chunk):
            sq += (self.hnet.weights(lat[i : i + chunk]) - mean).pow(2).sum(0)
        std = (sq / max(len(lat) - 1, 1)).sqrt()
        self.w_mean.copy_(mean)
        self.w_scale.copy_(std.mean().clamp(min=1e-8))

    def on_fit_start(self) -> None:
        # after a resumed run's checkpoint is restored, so the statistics are computed once
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.normalize and self.w_scale.item() == 0 and dm is not None:
            self.fit_normalizer(dm.adaptation_data.tensors["latents"][0])

    def init_latents(self, task: Tensor) -> Tensor:
        """Zero-shot latents ``[B, latent]``: the encoding of the HNet's initial weights G_θ(z0)."""
        mu, logvar = self.vae.encode(self.to_vae(self.hnet.weights(self.hnet.z0.unsqueeze(0))))
        if self.hparams.init_latent == "mean":
            return mu.expand(task.shape[0], -1)
        seed = (global_seed(), self.hparams.eval_seed)
        eps = np.stack(
            [np.random.default_rng([*seed, int(t)]).standard_normal(self.latent_dim) for t in task]
        )
        return self.vae.sample(mu, logvar, torch.as_tensor(eps, dtype=mu.dtype, device=mu.device))

    # --- training ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and dm is not None:
            check_adaptation(dm.adaptation_data, self.adaptation_source(self.hparams.upstream))

    def on_train_epoch_start(self) -> None:
        sync_random_state(self)  # the ranks draw the global batch's noise alike

    def training_step(self, batch: LatentBatch, batch_idx: int) -> Tensor:
        rows = global_batch(self, len(batch))
        with torch.no_grad():
            w = self.to_vae(self.hnet.weights(batch.latent))
        # the reparameterisation noise of the whole global batch, this rank's rows (stages.distributed)
        eps = rows.draw(lambda n: torch.randn(n, self.vae.latent_dim, device=w.device))
        recon, mu, logvar = self.vae(w, eps)
        loss, rec, kl = vae_loss(recon, w, mu, logvar, self.hparams.beta)
        B = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/rec", rec, batch_size=B)
        self.log("train/kl", kl, batch_size=B)
        self.log("train/mu_norm", mu.detach().norm(dim=-1).mean(), batch_size=B)
        self.log("train/std", logvar.detach().mul(0.5).exp().mean(), batch_size=B)
        return loss * rows.weight  # DDP's average over ranks is then the global batch's mean

    def configure_optimizers(self):
        return self.optimizer_factory(self.vae.parameters())

    # --- evaluation ----------------------------------------------------------------------------------
    def reconstruction(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Support-adapted HNet weights w, their reconstruction decode(μ(w)): query hits and VAE terms."""
        z = self.hnet.support_latents(batch)
        with torch.no_grad():
            w = self.hnet.weights(z)
            v = self.to_vae(w)
            mu, logvar = self.vae.encode(v)
            v_rec = self.vae.decode(mu)
            loss, rec, kl = vae_loss(v_rec, v, mu, logvar, self.hparams.beta)
            w_rec = self.from_vae(v_rec)
        src_correct, total = query_hits(self.adapter, batch, w)
        correct, _ = query_hits(self.adapter, batch, w_rec)
        return {
            "correct": correct,
            "source_correct": src_correct,
            "total": total,
            "loss": loss,
            "rec": rec,
            "kl": kl,
            "mu_norm": mu.norm(dim=-1),
        }

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        B = len(batch)
        with grad_enabled(batch) as b:
            init = self.init_latents(b.task).detach()
            res = self.protocol.evaluate(self.adapter, b, init, self.weights, shots=[0, "full"])
            r = self.reconstruction(b)
        n = r["total"].clamp(min=1)
        values = {
            "acc_zero_shot": 100 * res["model"][0].correct / n,
            "acc_few_shot": 100 * res["model"]["full"].correct / n,
            "recon_acc": 100 * r["correct"] / n,
            "recon_source_acc": 100 * r["source_correct"] / n,
            "mu_norm": r["mu_norm"],
        }
        for key, v in values.items():
            self.val_metrics[key].update(v)
        for key in ("loss", "rec", "kl"):
            self.val_metrics[key].update(r[key], weight=B)
        for key, metric in self.val_metrics.items():
            self.log(f"val/{key}", metric, batch_size=B)
        selected = "recon_acc" if self.hparams.select_on == "recon" else "acc_few_shot"
        self.log("val/acc", self.val_metrics[selected], prog_bar=True, batch_size=B)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        with grad_enabled(batch) as b:
            res = self.protocol.evaluate(self.adapter, b, self.init_latents(b.task).detach(), self.weights)
            r = self.reconstruction(b)
        self.collector.add_evaluation(HVAE, batch.task, res)
        everyone = torch.ones_like(r["total"], dtype=torch.bool)
        self.collector.add(HVAE_RECON, batch.task, {"full": ShotResult(r["correct"], r["total"], everyone)})

    def on_test_epoch_end(self) -> None:
        finish_test(self, self.collector, self.hparams.results_dir, "HVAE")
