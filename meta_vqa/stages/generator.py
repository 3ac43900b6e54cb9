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
