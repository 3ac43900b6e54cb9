"""HyperLDM: conditional latent diffusion over adapted latents with classifier-free guidance (the paper's
hypernetwork latent diffusion model).

Training data: the adaptation dataset's latents mapped into the generator's latent space (HNet latents,
or for an HVAE generator a stochastic encoding of their weights), standardised per dimension with a
mean and std stored as buffers (so the checkpoint is self-contained). ε-prediction MLP on
[x̃_t, question, sinusoidal(t)], cosine schedule with T = 1000; classifier-free training replaces each
condition by the null (zero) vector with probability ``p_uncond`` (Bernoulli per example; the authors'
code replaced a fixed count per batch, and left classifier-free training off by default). The EMA of the weights is kept by Lightning's ``EMAWeightAveraging`` callback
(configs), which swaps it in for validation and writes it into the checkpoints that ``test`` loads.

Sampling (zero-shot) runs every task of a batch at once: DDPM with all T steps (the paper) or DDIM /
DPM-Solver with k steps, CFG with scale γ, and optionally **combined guidance**: CFG plus the gradient of
a HyperCLIP model (``hyperclip_ckpt``) with its own scale. Few-shot fine-tunes the sampled latent.
Method ids ``{hnet,hvae}_hyperldm`` (with ``gamma``) and ``{hnet,hvae}_combined`` (with ``gamma`` and
``classifier_scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.latents import LatentBatch
from meta_vqa.data.shards import eval_batch_index
from meta_vqa.diffusion.guidance import guided_eps_fn
from meta_vqa.diffusion.schedule import Sampler, Schedule, add_noise, alphas_cumprod, sample
from meta_vqa.errors import ConfigError
from meta_vqa.eval.methods import Control, guided_method
from meta_vqa.nets.denoiser import LatentDenoiser
from meta_vqa.stages.common import grad_enabled
from meta_vqa.stages.distributed import global_batch
from meta_vqa.stages.guidance import GuidanceStage, control_questions
from meta_vqa.stages.handoff import attach_upstream
from meta_vqa.stages.hyperclip import HyperCLIPStage


class HyperLDMStage(GuidanceStage):
    """Conditional diffusion over generator latents, sampled with classifier-free (and HyperCLIP) guidance.

    Args:
        upstream_ckpt: the generator's checkpoint (HNet-MAML or HVAE stage).
        upstream: the upstream record kept in this stage's checkpoint (leave unset).
        hyperclip_ckpt: a HyperCLIP checkpoint for combined guidance (None = CFG only).
        hyperclip: its record kept in this stage's checkpoint (leave unset).
        feature_dim, question_dim: linked from the data.
        width, depth, time_dim: the denoiser MLP (128, 2, 100: the authors' 161k parameters).
        standardize_condition: standardise the question embedding with training statistics and learn
            the null embedding (off = the authors' raw embedding; see :class:`LatentDenoiser`).
        timesteps, schedule: T and the noise schedule (1000, cosine).
        p_uncond: probability of the null condition in training (0.2).
        sampler, sample_steps: the test sampler (``ddpm`` with 1000 steps = the paper; ``ddim``/``dpm``).
        clip_x0: clamp x̂0 to ±clip_x0 in DDPM/DDIM steps (None = off, the paper; see ``make_scheduler``).
        gammas: CFG scales of the test sweep; ``gamma`` is the main one (few-shot, controls, combined).
        classifier_scales: HyperCLIP scales of combined guidance (needs ``hyperclip_ckpt``).
        val_sampler, val_steps, val_gamma: the cheaper sampling used for model selection.
        controls: descriptions evaluated at ``gamma`` in ``test`` (aligned, shuffled, empty).
        max_shots, eval_seed: n-shot trials and the seed of subsets and sampling noise.
        results_dir: where ``test`` writes results.json/.md.
        optimizer: Adam, lr 1e-3.
    """

    guidance, title = "hyperldm", "HyperLDM"

    def __init__(
        self,
        upstream_ckpt: str | None = None,
        upstream: dict | None = None,
        hyperclip_ckpt: str | None = None,
        hyperclip: dict | None = None,
        feature_dim: int = 768,
        question_dim: int = 768,
        width: int = 128,
        depth: int = 2,
        time_dim: int = 100,
        standardize_condition: bool = False,
        timesteps: int = 1000,
        schedule: Schedule = "cosine",
        p_uncond: float = 0.2,
        sampler: Sampler = "ddpm",
        sample_steps: int = 1000,
        clip_x0: float | None = None,
        gamma: float = 1.0,
        gammas: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 4.0),
        classifier_scales: tuple[float, ...] = (),
        val_sampler: Sampler = "ddim",
        val_steps: int = 50,
        val_gamma: float = 1.0,
        controls: tuple[Control, ...] = ("aligned", "shuffled", "empty"),
        max_shots: int = 5,
        eval_seed: int = 42,
        results_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        gen = self.attach_generator(upstream_ckpt, upstream, feature_dim, max_shots, eval_seed)
        self.combined_method = guided_method(gen.kind, "combined")
        self.classifier = None
        if hyperclip_ckpt is not None or hyperclip is not None:
            self.classifier, rec = attach_upstream(
                hyperclip_ckpt, hyperclip, expected=(HyperCLIPStage,), key="model.hyperclip_ckpt"
            )
            self.hparams["hyperclip"] = rec
            if self.classifier.module.generator.adapter.num_params != gen.adapter.num_params:
                raise ConfigError("model.hyperclip_ckpt: its weight encoder expects another adapter size")
        elif classifier_scales:
            raise ConfigError("model.classifier_scales: combined guidance needs model.hyperclip_ckpt")
        d = gen.latent_dim
        self.denoiser = LatentDenoiser(d, question_dim, time_dim, width, depth, standardize_condition)
        self.register_buffer("alpha_bar", alphas_cumprod(timesteps, schedule).float(), persistent=False)
        self.register_buffer("latent_mean", torch.zeros(d))
        self.register_buffer("latent_std", torch.ones(d))
        self.register_buffer("stats_ready", torch.tensor(False))
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in ("acc_zero_shot", "latent_norm")})

    # --- latent statistics ---------------------------------------------------------------------------
    def fit_statistics(self, data) -> None:
        """Per-dimension mean and std of the training latents, and the question statistics of the
        denoiser, computed once (kept in the checkpoint; a resumed run keeps its own)."""
        if bool(self.stats_ready):
            return
        lat = data.tensors["latents"].flatten(0, 1).to(self.device)
        x = torch.cat([self.generator.from_adaptation(chunk) for chunk in lat.split(4096)])
        self.latent_mean.copy_(x.mean(0))
        self.latent_std.copy_(x.std(0).clamp(min=1e-6))
        self.denoiser.set_condition_stats(data.tensors["questions"].to(self.device).float())
        self.stats_ready.fill_(True)

    def standardize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def unstandardize(self, x: Tensor) -> Tensor:
        return x * self.latent_std + self.latent_mean

    # --- training ------------------------------------------------------------------------------------
    def training_step(self, batch: LatentBatch, batch_idx: int) -> Tensor:
        rows = global_batch(self, len(batch))
        x0 = self.standardize(self.training_latents(batch, rows))
        B, dev = x0.shape[0], x0.device
        # t, ε and the null-condition draw of the whole global batch, this rank's rows (stages.distributed)
        t = rows.draw(lambda n: torch.randint(0, self.hparams.timesteps, (n,), device=dev))
        noise = rows.draw(lambda n: torch.randn(n, *x0.shape[1:], device=dev, dtype=x0.dtype))
        keep = rows.draw(lambda n: torch.rand(n, 1, device=dev)) >= self.hparams.p_uncond
        cond = batch.question * keep
        eps = self.denoiser(add_noise(x0, noise, t, self.alpha_bar), t, cond)
        loss = F.mse_loss(eps.float(), noise.float())  # float32 under mixed precision
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        return loss * rows.weight  # DDP's average over ranks is then the global batch's mean

    def configure_optimizers(self):
        return self.optimizer_factory(self.denoiser.parameters())

    # --- sampling ------------------------------------------------------------------------------------
    def classifier_score(self, questions: Tensor):
        """log p(c | x̂0) up to a constant: HyperCLIP's cosine of the decoded weights and the question."""
        clip, gen = self.classifier.module, self.generator
        return lambda x0: clip.similarity(gen.weights(self.unstandardize(x0)), questions)

    def sample_latents(
        self,
        questions: Tensor,
        gamma: float,
        seed: int,
        sampler: Sampler | None = None,
        steps: int | None = None,
        classifier_scale: float = 0.0,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> Tensor:
        """Generator latents ``[B, d]`` for the questions ``[B, d_q]`` (one batch, every task at once)."""
        hp = self.hparams
        kind = sampler or hp.sampler
        clip_x0 = None if kind == "dpm" else clip_x0 if clip_x0 is not None else hp.get("clip_x0")
        g = torch.Generator(device=questions.device).manual_seed(seed)
        score = self.classifier_score(questions) if classifier_scale else None
        eps_fn = guided_eps_fn(self.denoiser, questions, gamma, self.alpha_bar, score, classifier_scale)
        x = sample(
            eps_fn,
            (questions.shape[0], self.generator.latent_dim),
            kind,
            steps or hp.sample_steps,
            g,
            questions.device,
            hp.timesteps,
            hp.schedule,
            progress,
            clip_x0,
        )
        return self.unstandardize(x)

    def _seed(self, batch_idx: int) -> int:
        # the same noise for every γ and control of a batch (paired comparisons); per batch of one process,
        # so that DDP ranks (which evaluate one process's batches) sample what one process samples
        index = eval_batch_index(batch_idx, self.global_rank, self.trainer.world_size)
        return self.hparams.eval_seed * 1_000_003 + index

    # --- evaluation ----------------------------------------------------------------------------------
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        hp = self.hparams
        z = self.sample_latents(
            batch.question, hp.val_gamma, self._seed(batch_idx), hp.val_sampler, hp.val_steps
        )
        self.val_metrics["acc_zero_shot"].update(self.generator.query_accuracy(z, batch))
        self.val_metrics["latent_norm"].update(z.norm(dim=-1))
        for key, metric in self.val_metrics.items():
            self.log(f"val/{key}", metric, batch_size=len(batch))
        self.log("val/acc", self.val_metrics["acc_zero_shot"], prog_bar=True, batch_size=len(batch))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        hp, gen, seed = self.hparams, self.generator, self._seed(batch_idx)
        with grad_enabled(batch) as b:
            for gamma in sorted(set(hp.gammas) | {hp.gamma}):
                z = self.sample_latents(b.question, gamma, seed)
                main = gamma == hp.gamma  # few-shot, latents and controls only at the main γ
                res = self.protocol.evaluate(gen.adapter, b, z, gen.weights, shots=None if main else [0])
                self.record(batch, res, "aligned", z if main else None, gamma=gamma)
            for control in hp.controls:
                if control == "aligned":
                    continue
                z = self.sample_latents(control_questions(b, control), hp.gamma, seed)
                res = self.protocol.evaluate(gen.adapter, b, z, gen.weights, shots=[0])
                self.record(batch, res, control, gamma=hp.gamma)
            for scale in hp.classifier_scales:
                z = self.sample_latents(b.question, hp.gamma, seed, classifier_scale=scale)
                res = self.protocol.evaluate(gen.adapter, b, z, gen.weights, shots=[0, "full"])
                self.record(
                    batch, res, "aligned", method=self.combined_method, gamma=hp.gamma, classifier_scale=scale
                )

    def recorded_settings(self) -> dict:
        return {"gamma": self.hparams.gamma}
