"""The adaptation dataset on disk and the latent batches read from it.

``<out>/adaptation.safetensors``:

* ``latents`` [E, T, d]: per epoch, every meta-train task's latent adapted on a random subset of its
  data; tasks in the order of ``task_ids``; ``fractions`` [E, T] the subset fractions;
* ``task_ids`` [T] (rows of the dataset's question matrix) and ``questions`` [T, d_q] (raw embeddings,
  the same in every epoch, so stored once);
* ``z0`` [d]: the latent every adaptation started from;
* ``support_{train,val,test}_{latents,task_ids,questions}``: latents adapted on the support split only.

``<out>/adaptation.json`` (the sidecar): format, upstream checkpoint path and sha256, the config
(recipe, data, model) and the sha256 of the tensor file. The dataset counts as complete only when the
sidecar exists and the hash matches. While it is being made, finished jobs live in ``<out>/parts/``
(one file per job, written atomically), so an interrupted run resumes and never writes a job twice.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from meta_vqa.data.adaptation import SUPPORT_SETS, AdaptationJob
from meta_vqa.data.features import save_tensors
from meta_vqa.data.shards import ShardedSampler, share
from meta_vqa.errors import DataError
from meta_vqa.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "meta_vqa.adaptation/1"
DATA_FILE = "adaptation.safetensors"
SIDECAR = "adaptation.json"
PARTS = "parts"
RUN_FILE = "run.json"


# --- writing -----------------------------------------------------------------------------------------
def parts_dir(out: str | Path) -> Path:
    return Path(out) / PARTS


def finished_jobs(out: str | Path) -> set[str]:
    """Names of the jobs whose part file is complete (atomic writes: a file that exists is whole)."""
    d = parts_dir(out)
    return {p.stem for p in d.glob("*.safetensors")} if d.is_dir() else set()


def write_part(out: str | Path, job: str, tensors: dict[str, Tensor]) -> Path:
    path = parts_dir(out) / f"{job}.safetensors"
    save_tensors(path, tensors)
    return path


def read_run(out: str | Path) -> dict | None:
    """The fingerprint of the run that wrote the parts (or of the finished dataset), if any."""
    for path in (Path(out) / SIDECAR, parts_dir(out) / RUN_FILE):
        if path.is_file():
            rec = read_json(path, "adaptation metadata")
            if not isinstance(rec, dict) or "config" not in rec:
                raise DataError(f"{path}: unreadable adaptation metadata (no 'config')")
            return rec["config"]
    return None


def write_run(out: str | Path, config: dict) -> None:
    write_json(parts_dir(out) / RUN_FILE, {"format": FORMAT, "config": config})


def consolidate(out: str | Path, jobs: list[AdaptationJob], config: dict) -> Path:
    """Merge the part files into ``adaptation.safetensors`` + sidecar, then remove ``parts/``."""
    out = Path(out)
    parts = {j.name: _load(parts_dir(out) / f"{j.name}.safetensors") for j in jobs}
    tensors: dict[str, Tensor] = {}
    for s in SUPPORT_SETS:
        for key in ("latents", "task_ids", "questions"):
            tensors[f"support_{s}_{key}"] = parts[f"support_{s}"][key]
    epochs = [parts[j.name] for j in jobs if j.kind == "epoch"]
    train_ids = tensors["support_train_task_ids"]
    for j, p in zip((j for j in jobs if j.kind == "epoch"), epochs):
        if not torch.equal(p["task_ids"], train_ids):
            raise DataError(f"{parts_dir(out) / j.name}.safetensors: task order differs from support_train")
    d = tensors["support_train_latents"].shape[1]
    tensors["latents"] = (
        torch.stack([p["latents"] for p in epochs]) if epochs else torch.zeros(0, len(train_ids), d)
    )
    tensors["fractions"] = (
        torch.stack([p["fractions"] for p in epochs]) if epochs else torch.zeros(0, len(train_ids))
    )
    tensors["task_ids"] = train_ids.clone()  # safetensors stores no aliases
    tensors["questions"] = tensors["support_train_questions"].clone()
    tensors["z0"] = parts["support_train"]["z0"]
    save_tensors(out / DATA_FILE, tensors, metadata={"format": FORMAT})
    shapes = {k: list(v.shape) for k, v in sorted(tensors.items())}
    write_json(
        out / SIDECAR,
        {
            "format": FORMAT,
            "upstream": config.get("upstream"),
            "config": config,
            "shapes": shapes,
            "sha256": {DATA_FILE: sha256_file(out / DATA_FILE)},
        },
    )
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    log.info("wrote %s (%d epochs × %d tasks × %d)", out / DATA_FILE, len(epochs), len(train_ids), d)
    return out / DATA_FILE


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: unreadable safetensors file ({e})") from None


# --- reading -----------------------------------------------------------------------------------------
REQUIRED = ("latents", "fractions", "task_ids", "questions", "z0") + tuple(
    f"support_{s}_{k}" for s in SUPPORT_SETS for k in ("latents", "task_ids", "questions")
)


@dataclass
class AdaptationData:
    """A complete adaptation dataset in memory (latents are small: 100 × 870 × 128 floats ≈ 45 MB)."""

    path: Path
    tensors: dict[str, Tensor]
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> AdaptationData:
        """Read and validate ``<dir>/adaptation.safetensors`` (or that file); errors name the file and key."""
        path = Path(path)
        data_file = path / DATA_FILE if path.is_dir() or path.suffix != ".safetensors" else path
        sidecar = data_file.with_name(SIDECAR)
        if not data_file.is_file():
            hint = (
                " (an unfinished run: rerun `meta-vqa predict` to resume)"
                if parts_dir(data_file.parent).is_dir()
                else ""
            )
            raise DataError(f"{data_file}: adaptation dataset not found{hint}")
        if not sidecar.is_file():
            raise DataError(f"{sidecar}: sidecar missing; the adaptation dataset is incomplete")
        meta = read_json(sidecar, "adaptation sidecar")
        if meta.get("format") != FORMAT:
            raise DataError(f"{sidecar}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("sha256", {}).get(DATA_FILE) != sha256_file(data_file):
            raise DataError(
                f"{data_file}: sha256 differs from {sidecar.name}; the file was changed or truncated"
            )
        tensors = _load(data_file)
        missing = [k for k in REQUIRED if k not in tensors]
        if missing:
            raise DataError(f"{data_file}: missing tensor {missing[0]!r}")
        data = cls(data_file, tensors, meta)
        data._check_shapes()
        data._check_finite()
        return data

    def _check_finite(self) -> None:
        """Latents and questions must be finite (a diverged HNet would hand on NaN latents)."""
        for key, t in sorted(self.tensors.items()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = (~torch.isfinite(t)).nonzero()[0].tolist()
                raise DataError(f"{self.path}: {key!r} is not finite at index {where}")

    def _check_shapes(self) -> None:
        t = self.tensors
        if t["latents"].dim() != 3:
            raise DataError(
                f"{self.path}: 'latents' must be [epochs, tasks, d], got {list(t['latents'].shape)}"
            )
        E, T, d = t["latents"].shape
        expect = {
            "fractions": (E, T),
            "task_ids": (T,),
            "z0": (d,),
        }
        for key, shape in expect.items():
            if tuple(t[key].shape) != shape:
                raise DataError(
                    f"{self.path}: {key!r} has shape {list(t[key].shape)}, expected {list(shape)}"
                )
        if t["questions"].dim() != 2 or t["questions"].shape[0] != T:
            raise DataError(
                f"{self.path}: 'questions' has shape {list(t['questions'].shape)}, expected [{T}, d_q]"
            )
        for s in SUPPORT_SETS:
            lat, ids = t[f"support_{s}_latents"], t[f"support_{s}_task_ids"]
            if lat.dim() != 2 or lat.shape[1] != d or ids.shape != (lat.shape[0],):
                raise DataError(
                    f"{self.path}: 'support_{s}_latents' has shape {list(lat.shape)}, expected [n, {d}]"
                )

    # --- views -----------------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return self.tensors["latents"].shape[0]

    @property
    def num_tasks(self) -> int:
        return self.tensors["latents"].shape[1]

    @property
    def latent_dim(self) -> int:
        return self.tensors["latents"].shape[2]

    @property
    def upstream_sha256(self) -> str | None:
        return (self.meta.get("upstream") or {}).get("sha256")

    def support(self, which: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(latents, task_ids, questions)`` adapted on the support split of ``which`` (train/val/test)."""
        t = self.tensors
        return t[f"support_{which}_latents"], t[f"support_{which}_task_ids"], t[f"support_{which}_questions"]


# --- training batches of latents ----------------------------------------------------------------------
@dataclass
class LatentBatch:
    """Adapted latents of B distinct meta-train tasks from one adaptation epoch."""

    latent: Tensor  # [B, d]
    task: Tensor  # [B]
    question: Tensor  # [B, d_q]
    epoch: int
    index: Tensor | None = None  # [B] flat positions e·T + i in the dataset's latents

    def __len__(self) -> int:
        return self.task.shape[0]


class LatentTasks(torch.utils.data.Dataset):
    """Flat index ``e·T + i`` → task i's latent of epoch e; a list of indices is read as one batch."""

    def __init__(self, data: AdaptationData):
        self.latents = data.tensors["latents"]
        self.task_ids = data.tensors["task_ids"]
        self.questions = data.tensors["questions"]
        self.T = data.num_tasks

    def __len__(self) -> int:
        return self.latents.shape[0] * self.T

    def __getitems__(self, idx: list[int]) -> LatentBatch:
        flat = torch.as_tensor(idx)
        e, i = flat // self.T, flat % self.T
        return LatentBatch(self.latents[e, i], self.task_ids[i], self.questions[i], int(e[0]), flat)

    def __getitem__(self, i: int | list[int]) -> LatentBatch:
        return self.__getitems__(i if isinstance(i, list) else [i])


class EpochBatches(ShardedSampler):
    """Each pass: one random adaptation epoch, its tasks shuffled, global batches of ``batch_size`` (leftovers
    dropped), each DDP rank its share (:mod:`meta_vqa.data.shards`); indices are flat positions ``e·T + i``.

    The choice depends only on ``(seed, pass)`` (Lightning calls :meth:`set_epoch`), so every rank draws the
    same epoch and permutation, any number of ranks trains on the same global batches, and a resumed run
    continues the same sequence (as the authors: one adaptation epoch per training epoch, e.g. 27 batches
    of 32). ``follow_epochs=False`` ignores :meth:`set_epoch`: every pass is pass 0 (see
    ``MetaVQADataModule``'s ``new_adaptation_epochs``).
    """

    def __init__(
        self,
        epochs: int,
        tasks: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        follow_epochs: bool = True,
    ):
        super().__init__(rank, world)
        self.follow_epochs = follow_epochs
        if epochs < 1:
            raise DataError("the adaptation dataset has no epochs; make it with data.adapt_epochs >= 1")
        if batch_size > tasks:  # e.g. the held-out-family split leaves fewer meta-train tasks
            log.warning(
                "data.batch_size: %d exceeds the %d tasks of the adaptation dataset; batches of %d",
                batch_size, tasks, tasks,
            )  # fmt: skip
            batch_size = tasks
        self._check_batch(batch_size)
        self.epochs, self.tasks, self.batch_size, self.seed = epochs, tasks, batch_size, seed

    def set_epoch(self, epoch: int) -> None:
        if self.follow_epochs:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.tasks // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        e = int(rng.integers(self.epochs))
        perm = rng.permutation(self.tasks)
        mine = share(self.batch_size, self.rank, self.num_replicas)
        for b in range(len(self)):
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield (e * self.tasks + batch[mine]).tolist()


def identity(batch):
    """Collate of a loader whose dataset returns whole batches."""
    return batch
