"""The one LightningDataModule of every stage: Meta-VQA tasks as batches of tensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from meta_vqa.data.batch import FeatureBank, TaskBatch, TaskIndexBatch
from meta_vqa.data.features import FeatureStore, feature_dir, read_manifest, verify_manifest
from meta_vqa.data.tasks import Task, load_tasks
from meta_vqa.errors import DataError

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
    """Meta-VQA tasks over a feature store (DESIGN.md "Data contracts").

    Batches are :class:`TaskBatch` objects: support/query image features, labels, answer-prompt
    features and masks of several tasks, gathered on the device from one resident feature matrix.

    Args:
        root: the dataset folder (``meta-vqa prepare`` writes it).
        split: ``random`` (the authors' 70/30 task split) or ``family`` (whole question families held out).
        encoder: which feature set to use; default: the manifest's.
        batch_size: tasks per training (meta-)batch.
        eval_batch_size: tasks per validation / test / predict batch.
        val_fraction: share of the meta-train tasks held out, seeded, for model selection.
        val_seed: seed of that choice.
        predict_split: the task set ``predict`` iterates over.
        verify: check every file's sha256 against the manifest when loading.
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
        predict_split: Literal["train", "val", "test"] = "test",
        verify: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.split = split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.predict_split = predict_split
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
    def _loader(self, which: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self._items[which],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=TaskIndexBatch.collate,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        if not self._items["val"]:
            return []
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, False, self.eval_batch_size)

    def loader(self, which: Literal["train", "val", "test"], batch_size: int | None = None) -> DataLoader:
        """An unshuffled loader over any task set (for evaluation outside a Trainer)."""
        return self._loader(which, False, batch_size or self.eval_batch_size)

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
        return batch

    def to_batch(self, batch: TaskIndexBatch, device: torch.device | str = "cpu") -> TaskBatch:
        """Move an index batch to ``device`` and gather its features (outside a Trainer)."""
        moved = TaskIndexBatch(**{k: v.to(device) for k, v in vars(batch).items()})
        return moved.gather(self.bank(device))
