"""Wiring shared by the stages: evaluation under Lightning's inference mode, results hand-off."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from meta_vqa.data.batch import TaskBatch
from meta_vqa.eval.results import EXTRA_KEYS, ResultCollector, render_compact, write_results
from meta_vqa.io import write_json
from meta_vqa.stages.distributed import gather_rows

log = logging.getLogger(__name__)
REFERENCES = ("chance", "majority")


def _shown(path: Path) -> str:
    """A path as a user would type it: relative to the working folder where it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def grad_enabled(batch: TaskBatch) -> Iterator[TaskBatch]:
    """Fine-tuning inside ``validation_step``/``test_step``: leave inference mode, enable autograd.

    Lightning evaluates under ``torch.inference_mode``; tensors made there cannot enter autograd, so
    the batch is cloned into ordinary tensors first.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield batch.clone() if batch.task.is_inference() else batch


def global_seed() -> int:
    """The seed LightningCLI's ``seed_everything`` set (0 if none)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def split_name(module: L.LightningModule) -> str:
    dm = getattr(module.trainer, "datamodule", None)
    return getattr(dm, "split", "unknown")


def finish_test(
    module: L.LightningModule,
    collector: ResultCollector,
    results_dir: str | None,
    title: str,
    diagnostics: dict | None = None,
) -> list[dict]:
    """Gather every rank's rows, write results.json/.md on rank 0, log the headline numbers.

    ``diagnostics``: a stage's extra test figures (e.g. HyperCLIP's retrieval accuracy), written beside the
    results as ``diagnostics.json`` with the method, split and seed, for the report.
    """
    trainer = module.trainer
    # ranks hold different numbers of rows (batches differ in size): a gather that allows that
    gather = (lambda rows: gather_rows(module, rows)) if trainer.world_size > 1 else None
    records = collector.records(split_name(module), global_seed(), gather)
    collector.reset()
    for r in records:
        if r["method"] in REFERENCES:  # the same in every stage: the report logs them once per run
            continue
        extra = "".join(f"_{k}{r[k]}" for k in EXTRA_KEYS if k in r)
        module.log(f"test/{r['method']}{extra}/acc_{r['shots']}", r["accuracy"], rank_zero_only=True)
    if trainer.is_global_zero:
        out = Path(results_dir or trainer.log_dir or ".")
        path = write_results(out, records, title)
        if diagnostics:
            info = {"split": split_name(module), "seed": global_seed(), **diagnostics}
            write_json(out / "diagnostics.json", info)
        log.info("%s\n   → %s", render_compact(records), _shown(path))
    return records
