"""What every Meta-VQA builder writes besides features: task files, prompts and the manifest's common part."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from meta_vqa.data.tasks import Task, save_tasks, task_statistics
from meta_vqa.io import sha256_file, write_json

TASK_FILES = ("meta_train.json", "meta_test.json")
RANDOM_SPLIT = {"random": {"meta_train": "meta_train.json", "meta_test": "meta_test.json"}}


def task_images(tasks: Sequence[Task]) -> list[str]:
    """Every image the tasks use, once, sorted (the row order of the image feature matrix)."""
    return sorted({img for t in tasks for img, _ in t.support + t.query})


def write_task_files(
    root: Path, train: Sequence[Task], test: Sequence[Task], sources: Sequence[Path] | None = None
) -> dict:
    """Write meta_train.json / meta_test.json: byte copies of ``sources`` if given (the authors' files stay
    exactly as published), else serialised from the tasks. Returns ``{file: sha256 of its source}``."""
    if sources is None:
        save_tasks(root / TASK_FILES[0], train)
        save_tasks(root / TASK_FILES[1], test)
        return {}
    recorded = {}
    for src, name in zip(sources, TASK_FILES):
        shutil.copyfile(src, root / name)
        recorded[name] = {"path": str(Path(src).resolve()), "sha256": sha256_file(src)}
    return recorded


def write_prompts(root: Path, prompts: Mapping[str, str], tasks: Sequence[Task]) -> None:
    """prompts.json with the templates of the tasks' questions only (the authors' file is a superset)."""
    write_json(root / "prompts.json", {t.question: prompts[t.question] for t in tasks})


def common_info(
    builder: str,
    version: int,
    encoder: str,
    features: Mapping[str, int],
    train: Sequence[Task],
    test: Sequence[Task],
    options: Mapping,
) -> dict:
    """The manifest fields every builder writes (``features``: dim, question_dim and the counts)."""
    return {
        "builder": builder,
        "builder_version": version,
        "encoder": encoder,
        "dim": features["dim"],
        "question_dim": features["question_dim"],
        "options": dict(options),
        "counts": {
            "meta_train": len(train),
            "meta_test": len(test),
            **{k: features[k] for k in ("images", "questions", "answer_prompts")},
        },
        "splits": RANDOM_SPLIT,
        "statistics": {"meta_train": task_statistics(train), "meta_test": task_statistics(test)},
    }
