"""What the guidance stages (HyperCLIP, HyperLDM) share: a frozen generator, its training latents, the
controls, the results and the generated latents of the test tasks.

:class:`GuidanceStage` attaches the generator (an HNet-MAML or HVAE checkpoint) through the one hand-off
helper, checks the adaptation dataset against it when training starts, and turns the dataset's latents into
training latents of the generator's space
(:meth:`~meta_vqa.stages.generator.LatentGenerator.training_latents`).
Its test bookkeeping records every method under ``<generator kind>_<guidance>`` with its ``control``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.latents import LatentBatch
from meta_vqa.errors import DataError
from meta_vqa.eval.methods import Control, guided_method
from meta_vqa.eval.protocol import Protocol
from meta_vqa.eval.results import ResultCollector
from meta_vqa.stages.common import finish_test, global_seed
from meta_vqa.stages.distributed import GlobalBatch, gather_rows, sync_random_state
from meta_vqa.stages.generator import LatentGenerator, require_unconditional
from meta_vqa.stages.handoff import attach_upstream, check_adaptation
from meta_vqa.stages.hnet import HNetStage
from meta_vqa.stages.hvae import HVAEStage

log = logging.getLogger(__name__)
GENERATOR_STAGES = (HNetStage, HVAEStage)


def control_questions(batch: TaskBatch, control: Control) -> Tensor:
    """The description a guided method is given: its own (``aligned``), another task's (``shuffled``:
    the next task of the batch) or none (``empty``: the null condition, the zero vector)."""
    if control == "aligned":
        return batch.question
    if control == "shuffled":
        return batch.question.roll(1, dims=0) if len(batch) > 1 else torch.zeros_like(batch.question)
    if control == "empty":
        return torch.zeros_like(batch.question)
    raise ValueError(f"unknown control {control!r}")


class GuidanceStage(L.LightningModule):
    """Base of the guidance stages. Subclasses call :meth:`attach_generator` in ``__init__`` (after
    ``save_hyperparameters``) and name their guidance (``hyperclip`` or ``hyperldm``) in ``guidance``."""

    guidance: str
    title: str

    def attach_generator(
        self,
        upstream_ckpt: str | None,
        upstream: dict | None,
        feature_dim: int,
        max_shots: int,
        eval_seed: int,
    ) -> LatentGenerator:
        """Attach the frozen generator as ``self.upstream``, record it in the hyper-parameters, check its
        feature size, and set up the protocol, the collector and the latent recorder."""
        self.upstream, record = attach_upstream(upstream_ckpt, upstream, expected=GENERATOR_STAGES)
        self.hparams["upstream"] = record
        gen = self.generator
        require_unconditional(gen, f"model.upstream_ckpt {record.get('path')}")
        if gen.adapter.dim != feature_dim:
            raise DataError(
                f"{record.get('path')}: the generator was trained on {gen.adapter.dim}-d features, "
                f"but the data has {feature_dim}-d features"
            )
        self.method = guided_method(gen.kind, self.guidance)
        self.protocol = Protocol(gen.eval_loop, max_shots, True, eval_seed, gen.budget)
        self.collector = ResultCollector()
        self.recorder = LatentRecorder()
        self.sample_training_latents = None
        return gen

    @property
    def generator(self) -> LatentGenerator:
        return self.upstream.module

    # --- training data ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":  # before anything is trained or written: the data must suit the generator
            data = self.trainer.datamodule.adaptation_data
            check_adaptation(data, self.generator.adaptation_source(self.hparams.upstream))

    def on_fit_start(self) -> None:
        # here rather than in setup: the model is on its device, and a resumed run's state is restored
        data = self.trainer.datamodule.adaptation_data
        self.sample_training_latents = self.generator.training_latents(data.tensors["latents"])
        self.fit_statistics(data)

    def fit_statistics(self, data) -> None:
        """Statistics of the training latents a subclass keeps in its checkpoint (none by default)."""

    def training_latents(self, batch: LatentBatch, rows: GlobalBatch | None = None) -> Tensor:
        """The batch's adaptation latents in the generator's latent space (``rows``: the batch's place in
        the global batch, for random draws; default: all of it)."""
        if self.sample_training_latents is None:  # training without a Trainer (tests)
            return self.generator.from_adaptation(batch.latent)
        return self.sample_training_latents(batch, rows or GlobalBatch((len(batch),)))

    def on_train_epoch_start(self) -> None:
        sync_random_state(self)  # the ranks draw the global batch's noise alike

    # --- test bookkeeping ----------------------------------------------------------------------------
    def record(
        self,
        batch: TaskBatch,
        results: dict,
        control: Control = "aligned",
        z: Tensor | None = None,
        method: str | None = None,
        **extra,
    ) -> None:
        """Collect one guided evaluation (a :meth:`Protocol.evaluate` result) under ``method`` (default:
        the stage's). Given the latents ``z`` it is the stage's main evaluation: it also brings the
        chance/majority rows, and ``z`` is kept for the report's memorisation table."""
        method = method or self.method
        if z is None:
            self.collector.add(method, batch.task, results["model"], control=control, **extra)
            return
        self.collector.add_evaluation(method, batch.task, results, control=control, **extra)
        self.recorder.add(batch.task, z)

    def on_test_epoch_end(self) -> None:
        diagnostics = self.test_epoch_summary()
        meta = {"seed": global_seed(), **self.recorded_settings()}
        self.recorder.write(self, self.hparams.results_dir, self.method, **meta)
        title = f"{self.title} ({self.method})"
        finish_test(self, self.collector, self.hparams.results_dir, title, diagnostics)

    def test_epoch_summary(self) -> dict | None:
        """Extra test figures of a subclass, logged and returned for ``diagnostics.json`` (none by default)."""
        return None

    def recorded_settings(self) -> dict:
        """Settings written beside the generated latents (e.g. γ)."""
        return {}


class LatentRecorder:
    """The latents a guidance stage generates for the test tasks, written beside its results together
    with the support-adapted latents of the meta-train and meta-test tasks (same latent space), so the
    report can measure memorisation (distance to the nearest meta-train latent) and plot the space."""

    FILE = "latents.safetensors"

    def __init__(self) -> None:
        self.rows: list[Tensor] = []

    def add(self, task: Tensor, z: Tensor) -> None:
        self.rows.append(torch.cat([task.double().unsqueeze(1), z.double()], 1).detach().cpu())

    def write(self, stage: GuidanceStage, results_dir: str | None, method: str, **meta) -> None:
        from safetensors.torch import save_file

        rows = gather_rows(stage, torch.cat(self.rows)) if self.rows else None
        self.rows = []
        trainer = stage.trainer
        dm = getattr(trainer, "datamodule", None)
        if rows is None or not trainer.is_global_zero or dm is None or results_dir is None:
            return
        if getattr(dm, "adaptation", None) is None:
            log.info("no data.adaptation: %s not written", self.FILE)
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
        to_gen = lambda lat: gen.from_adaptation(lat.to(stage.device).float()).cpu().float()
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
