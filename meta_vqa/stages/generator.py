"""What the guidance stages (HyperCLIP, HyperLDM) need from their frozen generator stage.

A generator is an HNet-MAML stage (latents = the HNet's) or an HVAE stage (latents = the VAE's, on top
of its own frozen HNet). The adaptation dataset always holds *HNet* latents; for an HVAE generator they
are mapped into the VAE's latent space by a stochastic encoding of the weights they produce
(the authors' ``train_on_vae`` route). Training and sampling therefore use the same latent space by
construction, which rules out SPEC §9.1 item 21 (HNet latents decoded by the HVAE).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from meta_vqa.data.batch import TaskBatch
from meta_vqa.errors import DataError
from meta_vqa.meta.maml import InnerLoop, adapt
from meta_vqa.nets.adapter import task_correct, task_losses
from meta_vqa.stages.handoff import attach_upstream
from meta_vqa.stages.hnet import HNetStage
from meta_vqa.stages.hvae import HVAEStage

GENERATORS = (HNetStage, HVAEStage)
Kind = Literal["hnet", "hvae"]


def attach_generator(stage, upstream_ckpt: str | None, upstream: dict | None, feature_dim: int):
    """Attach the frozen generator (HNet-MAML or HVAE checkpoint) to a guidance ``stage`` as
    ``stage.upstream``, record it in the stage's hyperparameters, and check its feature size."""
    stage.upstream, record = attach_upstream(upstream_ckpt, upstream, expected=GENERATORS)
    stage.hparams["upstream"] = record
    gen = stage.upstream.module
    if gen.adapter.dim != feature_dim:
        raise DataError(
            f"{record.get('path')}: the generator was trained on {gen.adapter.dim}-d features, "
            f"but the data has {feature_dim}-d features"
        )
    return gen


def generator_kind(gen) -> Kind:
    return "hvae" if isinstance(gen, HVAEStage) else "hnet"


@torch.no_grad()
def latents_from_adaptation(gen, hnet_latents: Tensor) -> Tensor:
    """Adaptation-dataset (HNet) latents in the generator's latent space."""
    if isinstance(gen, HVAEStage):
        mu, logvar = gen.vae.encode(gen.hnet.weights(hnet_latents))
        return gen.vae.sample(mu, logvar)
    return hnet_latents


class TrainingLatents:
    """The adaptation dataset's latents in the generator's latent space, for training a guidance stage.

    For an HNet generator they are the dataset's own. For an HVAE, each use draws a fresh
    ``z ~ q(z | G(z_hnet))``: the posterior of every dataset latent is computed once here (``prepare``), and
    a batch only samples from it, which has the same distribution as re-encoding the batch's weights
    every step at a small fraction of the cost.
    """

    def __init__(self) -> None:
        self.mu: Tensor | None = None
        self.logvar: Tensor | None = None

    @torch.no_grad()
    def prepare(self, gen, latents: Tensor, chunk: int = 1024) -> None:
        if not isinstance(gen, HVAEStage):
            return
        flat = latents.flatten(0, 1)
        parts = [gen.vae.encode(gen.hnet.weights(c.to(gen.device).float())) for c in flat.split(chunk)]
        self.mu = torch.cat([m for m, _ in parts])
        self.logvar = torch.cat([lv for _, lv in parts])

    @torch.no_grad()
    def __call__(self, gen, batch) -> Tensor:
        if not isinstance(gen, HVAEStage):
            return batch.latent
        if self.mu is None or batch.index is None:
            return latents_from_adaptation(gen, batch.latent)
        idx = batch.index.to(self.mu.device)
        return gen.vae.sample(self.mu[idx], self.logvar[idx])


def support_latents(gen, batch: TaskBatch, loop: InnerLoop | None = None) -> Tensor:
    """The generator's start latents fine-tuned on each task's support split (detached)."""

    def inner_loss(z: Tensor) -> Tensor:
        logits = gen.adapter(gen.weights(z), batch.support_x, batch.answers, batch.answer_mask)
        return task_losses(logits, batch.support_y, batch.support_mask)

    return adapt(
        gen.init_latents(batch.task).detach(), inner_loss, loop or gen.eval_loop, track_meta_grad=False
    )


@torch.no_grad()
def query_accuracy(gen, z: Tensor, batch: TaskBatch) -> Tensor:
    """Per-task query accuracy (%) of the weights of latents ``z``."""
    logits = gen.adapter(gen.weights(z), batch.query_x, batch.answers, batch.answer_mask)
    correct, total = task_correct(logits, batch.query_y, batch.query_mask)
    return 100 * correct / total.clamp(min=1)


def control_questions(batch: TaskBatch, control: str) -> Tensor:
    """The description a guided method is given: its own (``aligned``), another task's (``shuffled``:
    the next task of the batch) or none (``empty``: the null condition, the zero vector)."""
    if control == "aligned":
        return batch.question
    if control == "shuffled":
        return batch.question.roll(1, dims=0) if len(batch) > 1 else torch.zeros_like(batch.question)
    if control == "empty":
        return torch.zeros_like(batch.question)
    raise ValueError(f"unknown control {control!r}")


def gather_rows(module, rows: Tensor) -> Tensor:
    """Concatenate every rank's ``[n_rank, c]`` rows (any n per rank) on every rank."""
    trainer = module.trainer
    if trainer is None or trainer.world_size == 1:
        return rows
    n = torch.tensor(rows.shape[0], device=module.device)
    counts = module.all_gather(n).reshape(-1)
    padded = rows.new_zeros(int(counts.max()), rows.shape[1])
    padded[: rows.shape[0]] = rows
    every = module.all_gather(padded.to(module.device)).reshape(len(counts), -1, rows.shape[1]).cpu()
    return torch.cat([every[i, : int(c)] for i, c in enumerate(counts)])


class LatentRecorder:
    """The latents a guidance stage generates for the test tasks, written beside its results together
    with the support-adapted latents of the meta-train and meta-test tasks (same latent space), so the
    report can measure memorisation (distance to the nearest meta-train latent) and plot the space."""

    FILE = "latents.safetensors"

    def __init__(self) -> None:
        self.rows: list[Tensor] = []

    def add(self, task: Tensor, z: Tensor) -> None:
        self.rows.append(torch.cat([task.double().unsqueeze(1), z.double()], 1).detach().cpu())

    def write(self, stage, results_dir: str | None, method: str, **meta) -> None:
        import json
        import logging
        from pathlib import Path

        from safetensors.torch import save_file

        rows = gather_rows(stage, torch.cat(self.rows)) if self.rows else None
        self.rows = []
        trainer = stage.trainer
        dm = getattr(trainer, "datamodule", None)
        if rows is None or not trainer.is_global_zero or dm is None or results_dir is None:
            return
        if getattr(dm, "adaptation", None) is None:
            logging.getLogger(__name__).info("no data.adaptation: %s not written", self.FILE)
            return
        first, seen = [], set()
        for i, t in enumerate(rows[:, 0].long().tolist()):  # a DistributedSampler repeats tasks
            if t not in seen:
                seen.add(t)
                first.append(i)
        rows = rows[first]
        data, gen = dm.adaptation_data, stage.generator
        train_lat, train_ids, _ = data.support("train")
        test_lat, test_ids, _ = data.support("test")
        to_gen = lambda lat: latents_from_adaptation(gen, lat.to(stage.device).float()).cpu().float()
        tensors = {
            "generated": rows[:, 1:].float().contiguous(),
            "generated_task": rows[:, 0].long().contiguous(),
            "train": to_gen(train_lat),
            "train_task": train_ids.long().contiguous(),
            "test_adapted": to_gen(test_lat),
            "test_task": test_ids.long().contiguous(),
        }
        metadata = {
            "method": method,
            "split": str(dm.split),
            "questions": json.dumps(list(dm.store.questions)),  # what the *_task ids index
            **{k: json.dumps(v) for k, v in meta.items()},
        }
        out = Path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / self.FILE), metadata=metadata)
