"""Import the authors' precomputed CLIP ViT-L/14@336px features into the feature store, once.

The authors published their features as three pickled ``.npy`` dicts (image name → (1, d), question →
(1, d), question → (K, d) answer prompts in the order of the task's answers). They are read with the
restricted unpickler of :mod:`meta_vqa.prepare.pickles`, checked against the tasks and rewritten as
safetensors, so nothing downstream ever opens a pickle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from meta_vqa.data.features import write_features
from meta_vqa.data.tasks import Task
from meta_vqa.errors import DataError
from meta_vqa.io import sha256_file
from meta_vqa.prepare.layout import task_images
from meta_vqa.prepare.pickles import load_feature_dict

log = logging.getLogger(__name__)

ENCODER = "vit-l-14-336-authors"
AUTHORS_FILES = {
    "images": "ImageFeatures/image_features_vit-l-14-336px.npy",
    "questions": "QuesFeatures/ques_features_vit-l-14-336px.npy",
    "answers": "TextFeatures/text_features_vit-l-14-336px.npy",
}


def authors_feature_files(features_dir: str | Path) -> dict[str, Path]:
    """The three feature files under ``features_dir`` (the authors' ``data/VQA/Features`` layout)."""
    root = Path(features_dir)
    files = {kind: root / rel for kind, rel in AUTHORS_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise DataError(f"{path}: feature file not found (expected the authors' layout under {root})")
    return files


def _where(task: Task, source: Mapping[str, str] | None) -> str:
    origin = f" of {source[task.question]}" if source and task.question in source else ""
    return f"task {task.question!r}{origin}"


def _row(
    features: Mapping[str, np.ndarray], key: str, path: Path, what: str, width: int | None
) -> np.ndarray:
    """The (1, d) feature of ``key`` as a float32 vector, checked."""
    value = features.get(key)
    if value is None:
        raise DataError(f"{path}: no features for {what}")
    if value.shape[0] != 1 or (width is not None and value.shape[1] != width):
        raise DataError(f"{path}: features of {what} have shape {value.shape}, expected (1, {width or 'd'})")
    return value[0]


def _check_finite(matrix: np.ndarray, path: Path, names: Sequence[str]) -> None:
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: features of {names[int(bad.argmax())]!r} are not finite")


def import_authors_features(
    features_dir: str | Path,
    tasks: Sequence[Task],
    root: str | Path,
    encoder: str = ENCODER,
    task_source: Mapping[str, str] | None = None,
) -> dict:
    """Check the authors' features against ``tasks`` and write them to ``root``'s feature store.

    Only the images the tasks use are kept. Errors name the feature file, the task (and its task file,
    from ``task_source``: question → file) and the first missing image, question or answer set.

    Returns:
        ``dim``, ``question_dim``, the counts written and ``sources`` (path and sha256 of each file).
    """
    files = authors_feature_files(features_dir)
    sources = {kind: {"path": str(p.resolve()), "sha256": sha256_file(p)} for kind, p in files.items()}

    q_dict = load_feature_dict(files["questions"])
    a_dict = load_feature_dict(files["answers"])
    questions = [t.question for t in tasks]
    q_width = None
    q_rows = []
    for t in tasks:
        q_rows.append(
            _row(q_dict, t.question, files["questions"], f"question {_where(t, task_source)}", q_width)
        )
        q_width = q_rows[-1].shape[0]
    width = None
    answer_features = []
    for t in tasks:
        feats = a_dict.get(t.question)
        if feats is None:
            raise DataError(f"{files['answers']}: no answer-prompt features for {_where(t, task_source)}")
        width = width or feats.shape[1]
        if feats.shape != (t.num_answers, width):
            raise DataError(
                f"{files['answers']}: answer-prompt features of {_where(t, task_source)} have shape "
                f"{feats.shape}, expected ({t.num_answers}, {width}) for its {t.num_answers} answers"
            )
        _check_finite(feats, files["answers"], [f"{t.question} → {a}" for a in t.answers])
        answer_features.append(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)))
    question_matrix = np.stack(q_rows).astype(np.float32, copy=False)
    _check_finite(question_matrix, files["questions"], questions)
    del q_dict, a_dict

    i_dict = load_feature_dict(files["images"])
    image_ids = task_images(tasks)
    first_task = {}
    for t in tasks:
        for img, _ in t.support + t.query:
            first_task.setdefault(img, t)
    image_matrix = np.empty((len(image_ids), width), dtype=np.float32)
    for row, img in enumerate(image_ids):
        what = f"image {img!r} ({_where(first_task[img], task_source)})"
        image_matrix[row] = _row(i_dict, img, files["images"], what, width)
    unused = len(i_dict) - len(image_ids)
    del i_dict
    _check_finite(image_matrix, files["images"], image_ids)

    write_features(
        root,
        encoder,
        image_ids,
        torch.from_numpy(image_matrix),
        questions,
        torch.from_numpy(question_matrix),
        [list(t.answers) for t in tasks],
        answer_features,
    )
    info = {
        "dim": int(width),
        "question_dim": int(q_width),
        "images": len(image_ids),
        "questions": len(questions),
        "answer_prompts": sum(t.num_answers for t in tasks),
        "sources": sources,
    }
    log.info(
        "imported %d images (%d unused ones skipped), %d questions, %d answer prompts, width %d",
        len(image_ids),
        unused,
        len(questions),
        info["answer_prompts"],
        width,
    )
    return info
