"""The one LightningDataModule of every stage: Meta-VQA tasks as batches of tensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from meta_vqa.data.adaptation import (
    AdaptationChunks,
    AdaptationIndexBatch,
    AdaptationJob,
    AdaptationRecipe,
    first_item,
    plan_jobs,
)
from meta_vqa.data.batch import FeatureBank, TaskBatch, TaskIndexBatch, TaskItems
from meta_vqa.data.features import FeatureStore, feature_dir, read_manifest, verify_manifest
from meta_vqa.data.latents import AdaptationData, EpochBatches, LatentTasks, identity
from meta_vqa.data.resumable import resumable
from meta_vqa.data.shards import EvalBatches, JobChunks, TaskBatches
from meta_vqa.data.tasks import Task, load_tasks
from meta_vqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Split = Literal["random", "family"]
SPLIT_DIRS = {"random": ".", "family": "family"}


def task_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """Paths of the meta-train and meta-test task files of a split."""
    base = Path(root) / SPLIT_DIRS[split]
    return base / "meta_train.json", base / "meta_test.json"


def validation_slice(n: int, fraction: float, seed: int) -> list[int]:
    """Seeded choice of ``round(fraction·n)`` meta-train tasks (at least one) for validation."""
    if fraction <= 0 or n < 2:
        return []
    k = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:k].tolist())


class MetaVQADataModule(L.LightningDataModule):
    """Meta-VQA tasks over a feature store.

    Batches are :class:`TaskBatch` objects: support/query image features, labels, answer-prompt
    features and masks of several tasks, gathered on the device from one resident feature matrix.

    Args:
        root: the dataset folder (``meta-vqa prepare`` writes it).
        split: ``random`` (the authors' 70/30 task split) or ``family`` (whole question families held out).
        encoder: which feature set to use; default: the manifest's.
        batch_size: tasks per training (meta-)batch, over all processes: under DDP each of N ranks takes
            a share of every batch (about ``batch_size / N``), so N processes make the optimiser step of
            one (see :mod:`meta_vqa.data.shards`).
        eval_batch_size: tasks per validation / test / predict batch on each process (results are per
            task; it only bounds memory).
        val_fraction: share of the meta-train tasks held out, seeded, for model selection.
        val_seed: seed of that choice.
        predict_split: the task set ``predict`` iterates over; ``adaptation``: the jobs that make the
            adaptation dataset (see :mod:`meta_vqa.data.adaptation`).
        verify: check every file's sha256 against the manifest when loading.
        adapt_epochs: epochs of the adaptation dataset (random-subset adaptations of every train task).
        adapt_min_fraction: subsets keep ⌈N·f⌉ of a task's N examples, f ~ U[adapt_min_fraction, 1).
        adapt_steps, adapt_lr: the SGD loop that adapts each latent (10 steps, lr 0.1).
        adapt_seed: seed of the subsets.
        adaptation: an adaptation dataset (folder or ``adaptation.safetensors``); if set, training
            batches are :class:`~meta_vqa.data.latents.LatentBatch` es of adapted latents (HVAE,
            HyperCLIP, HyperLDM) from a random adaptation epoch.
        new_adaptation_epochs: draw that epoch and the task order anew for every training epoch (the
            paper's and the authors' way). False (the default, for now) keeps those of the first training
            epoch throughout, which is what every earlier run of this package did: the loader's batch
            sampler never saw Lightning's ``set_epoch``. Turning it on changes HVAE, HyperCLIP and
            HyperLDM results.
    """

    def __init__(
        self,
        root: str = "data/easy_vqa",
        split: Split = "random",
        encoder: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        predict_split: Literal["train", "val", "test", "adaptation"] = "test",
        verify: bool = True,
        adapt_epochs: int = 100,
        adapt_min_fraction: float = 2 / 3,
        adapt_steps: int = 10,
        adapt_lr: float = 0.1,
        adapt_seed: int = 42,
        adaptation: str | None = None,
        new_adaptation_epochs: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.split = split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.predict_split = predict_split
        if not 0.0 < adapt_min_fraction < 1.0:
            raise ConfigError(f"data.adapt_min_fraction: must lie in (0, 1), got {adapt_min_fraction}")
        if adapt_epochs < 0:
            raise ConfigError(f"data.adapt_epochs: must be >= 0, got {adapt_epochs}")
        self.adaptation_recipe = AdaptationRecipe(
            adapt_epochs, adapt_min_fraction, adapt_steps, adapt_lr, adapt_seed
        )
        self.adaptation = adaptation
        self.new_adaptation_epochs = new_adaptation_epochs
        self._adaptation_data: AdaptationData | None = None
        self._skip_jobs: set[str] = set()
        manifest = read_manifest(self.root)
        self.manifest = manifest
        self.encoder = encoder or manifest.get("encoder")
        if not self.encoder:
            raise DataError(f"{self.root / 'dataset.json'}: no 'encoder' key and none given")
        if verify:
            bad = verify_manifest(self.root, manifest)
            if bad:
                raise DataError(
                    f"{self.root / bad[0]}: missing or changed since the dataset was built "
                    f"(sha256 differs from dataset.json); rebuild with `meta-vqa prepare --force`"
                )
        self.store = FeatureStore.load(self.root, self.encoder, manifest.get("dim"))
        train_file, test_file = task_files(self.root, split)
        train_tasks, self.test_tasks = load_tasks(train_file), load_tasks(test_file)
        val_idx = set(validation_slice(len(train_tasks), val_fraction, val_seed))
        self.train_tasks = [t for i, t in enumerate(train_tasks) if i not in val_idx]
        self.val_tasks = [t for i, t in enumerate(train_tasks) if i in val_idx]
        self._items = {
            name: self._index(tasks, path)
            for name, tasks, path in (
                ("train", self.train_tasks, train_file),
                ("val", self.val_tasks, train_file),
                ("test", self.test_tasks, test_file),
            )
        }
        self._banks: dict[str, FeatureBank] = {}
        log.info(
            "%s split %s: %d train / %d val / %d test tasks, features %s (dim %d)",
            self.root,
            split,
            len(self.train_tasks),
            len(self.val_tasks),
            len(self.test_tasks),
            self.encoder,
            self.feature_dim,
        )

    # --- sizes other components link to ------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return self.store.dim

    @property
    def question_dim(self) -> int:
        return self.store.question_dim

    def tasks(self, which: Literal["train", "val", "test"]) -> list[Task]:
        return {"train": self.train_tasks, "val": self.val_tasks, "test": self.test_tasks}[which]

    def question(self, task_id: int) -> str:
        return self.store.questions[task_id]

    # --- validation of tasks against the features ---------------------------------------------------
    def _index(self, tasks: list[Task], source: Path) -> list[dict]:
        store = self.store
        fdir = feature_dir(self.root, self.encoder)
        q_row = {q: i for i, q in enumerate(store.questions)}
        img_row = {img: i for i, img in enumerate(store.image_ids)}
        items = []
        for t in tasks:
            if t.question not in q_row:
                raise DataError(f"{fdir / 'questions.json'}: no features for task {t.question!r} of {source}")
            i = q_row[t.question]
            if list(t.answers) != store.answers[i]:
                raise DataError(
                    f"{fdir / 'answers.json'}: task {t.question!r}: answers {store.answers[i]} "
                    f"differ from {list(t.answers)} in {source}"
                )
            rows = {}
            for part, pairs in (("support", t.support), ("query", t.query)):
                try:
                    rows[part] = [img_row[img] for img, _ in pairs]
                except KeyError as e:
                    raise DataError(
                        f"{source}: task {t.question!r}: image {e.args[0]!r} has no features in "
                        f"{fdir / 'images.json'}"
                    ) from None
            start = int(store.answer_offsets[i])
            items.append(
                {
                    "task": i,
                    "answers": list(range(start, start + t.num_answers)),
                    "support": rows["support"],
                    "support_y": [y for _, y in t.support],
                    "query": rows["query"],
                    "query_y": [y for _, y in t.query],
                }
            )
        return items

    # --- loaders -----------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        """``(rank, world size)`` of the Trainer this DataModule is attached to (0, 1 without one)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, which: str, shuffle: bool, batch_size: int) -> DataLoader:
        items = self._items[which]
        if shuffle:  # training: global batches, each rank its share (meta_vqa.data.shards)
            batches = TaskBatches(len(items), batch_size, *self._shard())
            return DataLoader(TaskItems(items), sampler=batches, batch_size=None, collate_fn=identity)
        # evaluation batches of similar-sized tasks: far less padding (results are per task); under DDP
        # each rank evaluates whole batches of one process (meta_vqa.data.shards.EvalBatches)
        items = sorted(items, key=lambda it: (len(it["support"]), len(it["query"])))
        batches = EvalBatches(len(items), batch_size, *self._shard())
        return DataLoader(TaskItems(items), sampler=batches, batch_size=None, collate_fn=identity)

    def _fit_loader(self, loader: DataLoader) -> DataLoader:
        # one process: a loader a resumed run continues mid-pass, drawing random numbers only when a batch
        # is taken (meta_vqa.data.resumable; the same batches and draws); several: Lightning shards it
        single = self.trainer is None or self.trainer.world_size == 1
        return resumable(loader) if single else loader

    def train_dataloader(self) -> DataLoader:
        if self.adaptation is not None:
            data = self.adaptation_data
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            batches = EpochBatches(
                data.epochs, data.num_tasks, self.batch_size, seed, *self._shard(), self.new_adaptation_epochs
            )
            loader = DataLoader(LatentTasks(data), sampler=batches, batch_size=None, collate_fn=identity)
            return self._fit_loader(loader)
        return self._fit_loader(self._loader("train", True, self.batch_size))

    def val_dataloader(self) -> DataLoader:
        if not self._items["val"]:
            return []
        return self._fit_loader(self._loader("val", False, self.eval_batch_size))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_split == "adaptation":
            jobs = [j for j in self.adaptation_jobs() if j.name not in self._skip_jobs]
            chunks = AdaptationChunks(jobs, self._items, self.adaptation_recipe, self.eval_batch_size)
            # whole jobs per rank: each job is adapted and written by one process, every job once
            mine = JobChunks(chunks.job_of_chunk, [len(j.items) for j in jobs], *self._shard())
            return DataLoader(chunks, batch_size=1, sampler=mine, collate_fn=first_item, num_workers=0)
        return self._loader(self.predict_split, False, self.eval_batch_size)

    def loader(self, which: Literal["train", "val", "test"], batch_size: int | None = None) -> DataLoader:
        """An unshuffled loader over any task set (for evaluation outside a Trainer)."""
        return self._loader(which, False, batch_size or self.eval_batch_size)

    # --- the adaptation dataset: making it (predict) and reading it (training of later stages) ---------
    def adaptation_jobs(self) -> list[AdaptationJob]:
        """Every job of the adaptation dataset, in the order ``predict`` runs them."""
        n = {k: len(v) for k, v in self._items.items()}
        return plan_jobs(n, self.adaptation_recipe)

    def adaptation_task_ids(self, which: Literal["train", "val", "test"]) -> list[int]:
        """Task ids (question-matrix rows) of a task set, in the order the adaptation dataset stores them."""
        return [it["task"] for it in self._items[which]]

    @property
    def fingerprint(self) -> str:
        """sha256 over the manifest's file hashes: changes whenever the dataset is rebuilt."""
        files = json.dumps(sorted(self.manifest.get("files", {}).items()))
        return hashlib.sha256(files.encode()).hexdigest()

    def skip_adaptation_jobs(self, names: set[str]) -> None:
        """Leave out jobs that are already written (an interrupted run resuming); set before ``predict``."""
        self._skip_jobs = set(names)

    @property
    def adaptation_data(self) -> AdaptationData:
        """The adaptation dataset named by ``adaptation``, checked against this dataset's meta-train tasks."""
        if self.adaptation is None:
            raise ConfigError("data.adaptation: this stage trains on an adaptation dataset; set its path")
        if self._adaptation_data is None:
            data = AdaptationData.load(self.adaptation)
            made_from = (data.meta.get("config") or {}).get("dataset")
            if made_from is not None and made_from != self.fingerprint:
                raise DataError(
                    f"{data.path}: made from another build of {self.root} (its dataset.json has changed "
                    "since); make the adaptation dataset again"
                )
            ids = data.tensors["task_ids"].tolist()
            if sorted(ids) != sorted(self.adaptation_task_ids("train")):
                raise DataError(
                    f"{data.path}: made for other meta-train tasks than data.root={str(self.root)!r} "
                    f"split={self.split!r} with this val_fraction/val_seed gives"
                )
            self._adaptation_data = data
        return self._adaptation_data

    # --- device side -------------------------------------------------------------------------------
    def bank(self, device: torch.device | str) -> FeatureBank:
        """The feature matrices on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._banks:
            s = self.store
            # built outside inference mode even when first asked for by a validation/test loop, so
            # the bank's tensors can later feed autograd
            with torch.inference_mode(False):
                bank = FeatureBank(s.images, s.question_features, s.answer_features).to(torch.device(device))
            self._banks[key] = bank
        return self._banks[key]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, TaskIndexBatch):
            return batch.gather(self.bank(batch.task.device))
        if isinstance(batch, AdaptationIndexBatch):
            return batch.gather(self.bank(batch.tasks.task.device))
        return batch

    def to_batch(self, batch: TaskIndexBatch, device: torch.device | str = "cpu") -> TaskBatch:
        """Move an index batch to ``device`` and gather its features (outside a Trainer)."""
        moved = TaskIndexBatch(**{k: v.to(device) for k, v in vars(batch).items()})
        return moved.gather(self.bank(device))
