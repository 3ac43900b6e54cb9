"""The prediction writer that makes the adaptation dataset (the authors' "precompute adaptation" step;
format in :mod:`meta_vqa.data.latents`).

``meta-vqa predict -c conf/<dataset>/adapt.yaml --ckpt_path hnet.ckpt`` runs the HNet stage's
``predict_step`` over the DataModule's adaptation jobs (``data.predict_split: adaptation``); this
callback collects each job's latents and writes the job as one part file as soon as it is complete.
When every job is written the parts are merged into ``adaptation.safetensors`` + ``adaptation.json``.

Resuming: a rerun with the same settings skips the jobs already written (the DataModule leaves them out
before the first batch), so an interrupted run continues at the last finished epoch and no epoch is ever
written twice (the authors' script appended to an existing file, duplicating epochs on a rerun). A rerun
with other settings (recipe, tasks, latent size, or another checkpoint) is refused unless
``overwrite: true``.

Under DDP every job belongs to one rank (the DataModule hands each rank whole jobs), which adapts it and
writes its part file; rank 0 alone removes, merges and writes the shared files, after a barrier. Every
rank runs the same checks on the same files, so a refusal stops all of them alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from meta_vqa.data.adaptation import SUPPORT_SETS, AdaptationBatch, AdaptationJob
from meta_vqa.data.latents import (
    DATA_FILE,
    SIDECAR,
    consolidate,
    finished_jobs,
    parts_dir,
    read_run,
    write_part,
    write_run,
)
from meta_vqa.errors import ConfigError, DataError
from meta_vqa.io import sha256_file

log = logging.getLogger(__name__)
COMPARED = ("recipe", "dataset", "tasks", "latent_dim", "question_dim")


class AdaptationWriter(BasePredictionWriter):
    """Write the adaptation dataset into ``out`` (resumable, atomic, never duplicated).

    Args:
        out: output folder (``adaptation.safetensors``, ``adaptation.json``; ``parts/`` while running);
            ``meta-vqa predict --stage_dir DIR`` sets it.
        overwrite: discard whatever ``out`` holds instead of resuming it.
    """

    def __init__(self, out: str | None = None, overwrite: bool = False):
        super().__init__("batch")
        self.out = Path(out) if out is not None else None
        self.overwrite = overwrite
        self.complete = False

    # --- before the first batch: what is left to do ---------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if self.out is None:
            raise ConfigError("--stage_dir: the folder to write the adaptation dataset to is not set")
        dm = trainer.datamodule
        if getattr(dm, "predict_split", None) != "adaptation":
            raise ConfigError("data.predict_split: must be 'adaptation' when AdaptationWriter is a callback")
        if getattr(pl_module, "kind", None) != "hnet":
            raise ConfigError(
                f"model: the adaptation dataset holds HNet-MAML latents; {type(pl_module).__name__} "
                "is not an HNet-MAML stage (--ckpt_path must be an hnet checkpoint)"
            )
        self.jobs: list[AdaptationJob] = dm.adaptation_jobs()
        self.ids = {s: dm.adaptation_task_ids(s) for s in SUPPORT_SETS}
        self.config = self._config(dm, pl_module)
        self._buffers: dict[str, dict[int, tuple]] = {}
        zero, strategy = trainer.is_global_zero, trainer.strategy
        if self.overwrite and zero:
            for name in (DATA_FILE, SIDECAR):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(parts_dir(self.out), ignore_errors=True)
        strategy.barrier("adaptation_writer_overwrite")
        existing = read_run(self.out)
        if existing is not None:
            self._check_same(existing)
        names = {j.name for j in self.jobs}
        if (self.out / DATA_FILE).is_file() and (self.out / SIDECAR).is_file():
            self.complete = True
            dm.skip_adaptation_jobs(names)
            made_by = (existing or {}).get("upstream") or {}
            log.info(
                "%s is complete (made from %s); nothing to do (overwrite: true to remake it)",
                self.out / DATA_FILE,
                made_by.get("checkpoint"),
            )
            return
        if zero:
            for job in self.jobs:  # empty task sets (e.g. no validation tasks) have no batches
                if not job.items and job.name not in finished_jobs(self.out):
                    self._write(job, {}, pl_module)
        # one list for every rank: the jobs left decide which rank adapts what
        done = strategy.broadcast(finished_jobs(self.out) & names, src=0)
        dm.skip_adaptation_jobs(done)
        if done:
            log.info("resuming %s: %d of %d jobs already written", self.out, len(done), len(names))
        if done == names and existing is not None:  # every part written, but not merged yet
            if zero:
                consolidate(self.out, self.jobs, existing)
            strategy.barrier("adaptation_writer_merged")
            self.complete = True

    def _config(self, dm, pl_module: L.LightningModule) -> dict:
        def digest(ids: list[int]) -> str:
            return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

        hparams = json.loads(json.dumps(dict(pl_module.hparams), default=str))
        return {
            "recipe": dm.adaptation_recipe.as_dict(),
            "dataset": dm.fingerprint,  # task ids are rows of this build's question matrix
            "tasks": {s: {"n": len(self.ids[s]), "sha256": digest(self.ids[s])} for s in SUPPORT_SETS},
            "latent_dim": int(pl_module.latent_dim),
            "question_dim": int(dm.question_dim),
            "data": {"root": str(dm.root), "split": dm.split, "encoder": dm.encoder},
            "model": {
                "class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                "hparams": hparams,
            },
        }

    def _check_same(self, existing: dict) -> None:
        for key in COMPARED:
            if existing.get(key) != self.config[key]:
                raise DataError(
                    f"{self.out}: holds an adaptation dataset made with other {key} "
                    f"({existing.get(key)} vs {self.config[key]}); use another output folder or overwrite: true"
                )

    # --- once the checkpoint is loaded: record which one -------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.complete:
            return
        ckpt = trainer.ckpt_path
        if not ckpt:
            raise ConfigError("--ckpt_path: the adaptation dataset is made from a trained HNet checkpoint")
        sha = sha256_file(ckpt)
        existing = read_run(self.out)
        made_by = (existing or {}).get("upstream", {}).get("sha256")
        if made_by and made_by != sha:
            raise DataError(
                f"{self.out}: partly written from a checkpoint with sha256 {made_by[:12]}…, not {ckpt} "
                f"(sha256 {sha[:12]}…); use another output folder or overwrite: true"
            )
        self.config["upstream"] = {"checkpoint": str(ckpt), "sha256": sha}
        if trainer.is_global_zero:
            write_run(self.out, self.config)
        trainer.strategy.barrier("adaptation_writer_run")  # recorded before any rank writes a part

    # --- per batch: collect, write each finished job ---------------------------------------------
    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch: AdaptationBatch, batch_idx, dataloader_idx
    ) -> None:
        buf = self._buffers.setdefault(batch.job, {})
        latent, question = prediction["latent"].detach().cpu(), prediction["question"].detach().cpu()
        fraction = batch.fraction.detach().cpu()
        for i, t in enumerate(prediction["task"].tolist()):
            buf[t] = (latent[i], question[i], fraction[i])
        job = next(j for j in self.jobs if j.name == batch.job)
        if len(buf) == len(job.items):
            self._write(job, self._buffers.pop(batch.job), pl_module)

    def _write(self, job: AdaptationJob, rows: dict[int, tuple], pl_module: L.LightningModule) -> None:
        ids = [self.ids[job.source][p] for p in job.items]
        d, dq = int(pl_module.latent_dim), int(self.config["question_dim"])
        tensors = {
            "latents": torch.stack([rows[t][0] for t in ids]) if ids else torch.zeros(0, d),
            "task_ids": torch.tensor(ids, dtype=torch.int64),
        }
        if job.kind == "support":
            tensors["questions"] = torch.stack([rows[t][1] for t in ids]) if ids else torch.zeros(0, dq)
            z0 = pl_module.init_latents(torch.zeros(1, dtype=torch.long, device=pl_module.device))[0]
            tensors["z0"] = z0.detach().float().cpu()
        else:
            tensors["fractions"] = torch.stack([rows[t][2] for t in ids]).float()
        write_part(self.out, job.name, tensors)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.complete:
            return
        trainer.strategy.barrier("adaptation_writer_parts")  # every rank's parts are written
        # rank 0's view, sent to every rank: a rank that looked itself could find the parts already merged
        # and removed by rank 0, take them for missing and skip the barrier below (a deadlock)
        missing = (
            sorted({j.name for j in self.jobs} - finished_jobs(self.out)) if trainer.is_global_zero else None
        )
        missing = trainer.strategy.broadcast(missing, src=0)
        if missing:
            log.warning("%s: %d jobs not written (%s…); rerun to resume", self.out, len(missing), missing[0])
            return
        if trainer.is_global_zero:
            consolidate(self.out, self.jobs, self.config)
        trainer.strategy.barrier("adaptation_writer_merged")
        self.complete = True
