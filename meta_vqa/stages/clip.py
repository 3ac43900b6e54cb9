"""Stage ``clip``: train the small CLIP's image tower against the locked MiniLM text tower.

Each image's caption is its colour and shape ("a red circle"). Because the text tower is locked, the
caption embeddings are a fixed matrix computed once; the loss is open_clip's image→text cross-entropy
over cosine logits scaled by a learnable temperature, with every distinct caption as a candidate. (The
in-batch form of the CLIP loss would treat the many images that share a caption as negatives of each
other; with 24 captions and batches of 128 that is most of the batch.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from meta_vqa.data.encode import images_to_input
from meta_vqa.data.shards import TaskBatches
from meta_vqa.device import check_trainer_precision
from meta_vqa.errors import ConfigError
from meta_vqa.nets.clip import (
    CLIP_DIR,
    LOGIT_SCALE_MAX,
    ClipConfig,
    LoadedClip,
    build_clip,
    build_tokenizer,
    clip_is_complete,
    load_clip,
    read_clip_config,
    save_clip,
    text_weights_sha256,
)
from meta_vqa.stages.distributed import RandomStateAfterConstruction

log = logging.getLogger(__name__)


def random_shift(
    images: torch.Tensor, max_shift: int, part: slice | None = None, total: int | None = None
) -> torch.Tensor:
    """Translate each image by its own random offset in ``[-max_shift, max_shift]`` pixels per axis.

    The border is replicated (easy-vqa backgrounds are flat), so no black frame appears. Shapes sit at
    random positions in the data already; this multiplies the positions seen in training. ``total``,
    ``part``: the offsets are drawn for a global batch of ``total`` images, of which ``images`` are the
    rows ``part`` (a DDP rank's share: every rank draws what one process draws, and takes its part).
    """
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, total or b, 1), device=images.device)
    dy, dx = offsets[:, part] if part is not None else offsets
    rows = (dy + torch.arange(h, device=images.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * max_shift)
    cols = (dx + torch.arange(w, device=images.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


class ClipStage(L.LightningModule):
    """Wires the CLIP of :mod:`meta_vqa.nets.clip` to Lightning; only the image tower and scale train.

    Args:
        config: the CLIP architecture.
        captions: the distinct captions; a label is an index into this list.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to zero).
        weight_decay: applied to weight matrices only (open_clip's exclusion of gains, biases, scale).
        warmup_fraction: fraction of the optimiser steps spent warming up.
        hflip: randomly mirror training images (colour and shape are mirror-invariant).
        max_shift: randomly translate training images by up to this many pixels (edges replicated).
    """

    def __init__(
        self,
        config: ClipConfig,
        captions: Sequence[str],
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        hflip: bool = True,
        max_shift: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "config": config.to_json(),
                "captions": list(captions),
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_fraction": warmup_fraction,
                "hflip": hflip,
                "max_shift": max_shift,
            }
        )
        self.config = config
        self.clip = build_clip(config)
        tokenizer = build_tokenizer(config)
        with torch.no_grad():
            text = self.clip.encode_text(tokenizer(list(captions)), normalize=True)
        # Not persistent: it follows from the captions and the locked tower.
        self.register_buffer("caption_features", text, persistent=False)

    def train(self, mode: bool = True) -> ClipStage:
        super().train(mode)
        self.clip.text.eval()  # the locked tower stays a fixed function (no dropout)
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``[B, captions]`` of images in pixel values 0..255 (uint8 or float)."""
        x = images_to_input(images, self.config.image_mean, self.config.image_std)
        feats = self.clip.encode_image(x, normalize=True)
        scale = self.clip.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        return scale * feats @ self.caption_features.T

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        # Under DDP each rank holds an equal share of the global batch (train_clip's loader): it draws the
        # augmentation of the whole batch, as one process does (every rank is seeded alike), and takes its
        # rows, so that N processes make the step of one (per-rank streams that never repeat each other).
        b, world = images.shape[0], self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if world > 1 else 0
        rows, total = slice(rank * b, (rank + 1) * b), b * world
        if self.hparams.hflip:
            flip = torch.rand(total, device=images.device)[rows] < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = random_shift(images, self.hparams.max_shift, rows, total)
        logits = self.logits(images)
        loss = F.cross_entropy(logits.float(), labels)  # float32 under mixed precision
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", 100 * (logits.argmax(-1) == labels).float().mean())  # %, as every stage
        self.log("train/logit_scale", self.clip.logit_scale.exp())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.logits(images).float()
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        hits = (logits.argmax(-1) == labels).float().mean()
        self.log("val/retrieval_accuracy", 100 * hits, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.clip.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def retrieval_accuracy(
    stage: ClipStage, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 image→caption retrieval accuracy among all distinct captions."""
    if len(images) == 0:
        return float("nan")
    stage.eval()
    hits = 0
    for start in range(0, len(images), batch_size):
        logits = stage.logits(images[start : start + batch_size].to(stage.device))
        hits += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    return hits / len(images)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run with ``num_threads`` intra-op threads (``None``: 1 on machines with ≤ 2 cores), then restore.

    The tiny CLIP's operations are small, so every one of them waits at an OpenMP barrier for all
    threads; when another process holds a core, each such wait costs a scheduler time slice. On 2 cores
    that made a step 20× slower than on one thread (measured: 1.8 s vs 0.15 s; 0.08 s on 2 idle cores).
    """
    before = torch.get_num_threads()
    n = num_threads if num_threads is not None else (1 if (os.cpu_count() or 1) <= 2 else before)
    torch.set_num_threads(max(1, n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def train_clip(
    config: ClipConfig,
    captions: Sequence[str],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 2021,
    log_dir: str | Path = "lightning_logs",
    progress: bool = True,
    num_threads: int | None = None,
    devices: int = 1,
    precision: str = "32-true",
) -> tuple[ClipStage, dict]:
    """Train the image tower; returns the stage (eval mode) and its train/held-out retrieval accuracy.

    ``num_threads``: torch intra-op threads while training (see :func:`torch_threads`).
    ``devices`` > 1: DDP in spawned processes (``ddp_spawn``: the rest of ``prepare`` stays in this one),
    ``batch_size`` is the global batch (``batch_size / devices`` per process). ``precision``: Lightning's
    (``bf16-mixed``; ``16-mixed`` needs CUDA).
    """
    check_trainer_precision(precision, "auto", "--clip-precision")
    if devices > 1 and batch_size % devices:
        raise ConfigError(f"--clip-devices: a batch of {batch_size} does not split over {devices} processes")
    L.seed_everything(seed, verbose=False)
    stage = ClipStage(config, captions, lr=lr)
    after_construction = RandomStateAfterConstruction()  # DDP ranks draw from here on, as one process does
    data = _ClipData(train_images, train_labels, val_images, val_labels, batch_size)
    from lightning.pytorch.callbacks import LearningRateMonitor

    from meta_vqa._quiet import quiet
    from meta_vqa.progress import StageProgress

    quiet()  # e.g. the locked text tower is in eval mode on purpose (see ClipStage.train)
    callbacks = [after_construction, LearningRateMonitor(logging_interval="step")]
    callbacks += [StageProgress()] if progress else []
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision=precision,
        default_root_dir=str(log_dir),  # ddp_spawn hands the weights back through a file here
        logger=TensorBoardLogger(str(log_dir), name="clip", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, len(train_images) // batch_size)),
        limit_val_batches=1.0 if len(val_images) else 0,
    )
    with torch_threads(num_threads) as threads:
        log.info("training the CLIP image tower on %d images, %d thread(s)", len(train_images), threads)
        trainer.fit(stage, datamodule=data)
        stage = stage.cpu()
        metrics = {
            "train_accuracy": retrieval_accuracy(stage, train_images, train_labels),
            "retrieval_accuracy": retrieval_accuracy(stage, val_images, val_labels),
            "logit_scale": stage.clip.logit_scale.detach().exp().item(),
            "train_images": len(train_images),
            "heldout_images": len(val_images),
            "captions": len(captions),
        }
    log.info("CLIP: held-out image→caption retrieval accuracy %.1f %%", 100 * metrics["retrieval_accuracy"])
    return stage, metrics


class _ClipData(L.LightningDataModule):
    """The CLIP's loaders, made on each rank: the shuffled training images in global batches of
    ``batch_size`` (the last partial one dropped), each rank its equal share (:class:`TaskBatches`: on one
    process exactly ``DataLoader(shuffle=True, drop_last=True)``); the held-out images in batches of 500."""

    def __init__(self, train_images, train_labels, val_images, val_labels, batch_size: int) -> None:
        super().__init__()
        self.train, self.val = (
            TensorDataset(train_images, train_labels),
            TensorDataset(val_images, val_labels),
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = TaskBatches(len(self.train), self.batch_size, rank, world, drop_last=True)
        return DataLoader(self.train, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=500)


def load_or_train_clip(
    dataset_root: str | Path,
    config: ClipConfig,
    captions: Sequence[str],
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    options: dict,
    force: bool = False,
    **train_kwargs,
) -> tuple[LoadedClip, bool]:
    """Reuse ``<dataset_root>/clip`` if it is complete and was trained with ``options``, else train it.

    ``options`` (JSON-able) describe everything the training depends on; they are stored with the
    weights, together with the metrics of :func:`train_clip`, in ``config.extra``. Returns the loaded
    CLIP and whether it was reused.
    """
    folder = Path(dataset_root) / CLIP_DIR
    if not force and clip_is_complete(folder):
        old = read_clip_config(folder)
        if old.extra.get("options") == options and old.text_weights_sha256 == text_weights_sha256():
            log.info("%s: trained CLIP found, reusing it", folder)
            return load_clip(dataset_root), True
    config = replace(config, text_weights_sha256=text_weights_sha256())
    stage, metrics = train_clip(config, captions, *train, *heldout, **train_kwargs)
    save_clip(folder, stage.clip, replace(config, extra={"options": options, "metrics": metrics}))
    return load_clip(dataset_root), False
