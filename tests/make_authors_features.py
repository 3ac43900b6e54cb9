"""Write a feature folder in the authors' format (pickled ``.npy`` dicts) for given task files.

For tests and for timing the import at the real size: every image, question and answer prompt the tasks
use gets random float32 features of the authors' shapes ((1, d) per image and question, (K, d) per task's
answers). Writing uses ``np.save(allow_pickle=True)`` as the authors did; only reading is restricted.

    python tests/make_authors_features.py --tasks ../shared/data/meta_vqa --out /tmp/authors --dim 768
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meta_vqa.data.tasks import Task, load_tasks
from meta_vqa.prepare.authors_features import AUTHORS_FILES


def save_pickled(path: Path, obj: dict, numpy1: bool = False) -> None:
    """``np.save`` of a dict; ``numpy1``: the payload as numpy 1.x writes it (protocol 3, ``numpy.core``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not numpy1:
        np.save(path, obj, allow_pickle=True)
        return
    wrapped = np.empty((), dtype=object)
    wrapped[()] = obj
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    raw = buf.getvalue()
    header_len = 10 + int.from_bytes(raw[8:10], "little")  # version 1.0 header
    payload = pickle.dumps(wrapped, protocol=3).replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(raw[:header_len] + payload)


def authors_feature_dicts(
    tasks: Sequence[Task], dim: int = 768, seed: int = 0, extra_images: int = 0
) -> dict:
    """``{"images", "questions", "answers"}`` dicts of random float32 features for ``tasks``."""
    rng = np.random.default_rng(seed)
    names = sorted({img for t in tasks for img, _ in t.support + t.query})
    names += [f"COCO_train2014_{900_000_000 + i:012d}" for i in range(extra_images)]  # unused by any task
    image_matrix = rng.standard_normal((len(names), dim), dtype=np.float32)
    images = {name: image_matrix[i : i + 1].copy() for i, name in enumerate(names)}
    questions = {t.question: rng.standard_normal((1, dim), dtype=np.float32) for t in tasks}
    answers = {t.question: rng.standard_normal((t.num_answers, dim), dtype=np.float32) for t in tasks}
    return {"images": images, "questions": questions, "answers": answers}


def write_authors_features(root: Path, dicts: dict, numpy1: Sequence[str] = ()) -> dict[str, Path]:
    """Save the dicts under ``root`` in the authors' layout; kinds in ``numpy1`` as numpy 1.x would."""
    paths = {kind: Path(root) / rel for kind, rel in AUTHORS_FILES.items()}
    for kind, path in paths.items():
        save_pickled(path, dicts[kind], numpy1=kind in numpy1)
    return paths


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="folder with meta_train.json and meta_test.json")
    p.add_argument("--out", required=True)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument(
        "--extra-images", type=int, default=0, help="images no task uses (the authors kept all COCO)"
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tasks = load_tasks(Path(args.tasks) / "meta_train.json") + load_tasks(Path(args.tasks) / "meta_test.json")
    dicts = authors_feature_dicts(tasks, args.dim, extra_images=args.extra_images)
    write_authors_features(Path(args.out), dicts)
    counts = {k: len(v) for k, v in dicts.items()}
    prompts = sum(v.shape[0] for v in dicts["answers"].values())
    print(f"{args.out}: {counts} ({prompts} answer prompts), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
