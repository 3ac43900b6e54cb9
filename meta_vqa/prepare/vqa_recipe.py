"""The paper's Meta-VQA construction from raw VQA v2: one few-shot task per question string.

The authors turned VQA v2 into a meta-learning benchmark by treating every distinct question string as a
multiple-choice task whose classes are its answers:

1. keep the question instances whose answer type is "number" or "other" (yes/no questions are dropped);
2. group instances by the exact question string, over train2014 and then val2014;
3. label = the annotation's ``multiple_choice_answer``; image ``COCO_{subset}_{image_id:012d}``; an image
   counts once per question (its first occurrence wins, later ones are ignored whatever their answer);
4. drop answers with fewer than 2 images;
5. keep a question iff more than 20 images remain, at least 2 answers remain and the whitespace token
   "or" is not in it (that removes "A or B?" questions, whose answers are spelled out in the question);
6. per answer, shuffle its images with a fresh ``random.Random(2021)``, first ``round(0.7 n)`` → support;
7. shuffle the task list with a fresh ``random.Random(2021)``, first ``round(0.7 N)`` → meta-train.

Iteration order decides both seeded shuffles, so it follows the authors' exactly: their VQA index is keyed
by question id in the order of the *annotation* file, train2014 first, then val2014. Questions therefore
appear in the order of their first instance in that walk, the instances of a question keep that walk's
order, and a question's answers appear in the order of their first kept image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from meta_vqa.data.tasks import MIN_IMAGES, Task, build_tasks, split_tasks, task_statistics
from meta_vqa.errors import DataError

log = logging.getLogger(__name__)

SUBSETS = ("train2014", "val2014")  # merged in this order
KEPT_ANSWER_TYPES = ("number", "other")
SEED = 2021


def vqa_files(vqa_root: str | Path, subset: str) -> tuple[Path, Path]:
    """The questions and annotations files of one subset.

    Found directly in ``vqa_root`` or in its ``Questions/`` and ``Annotations/`` folders (the layout of
    the VQA download).
    """
    root = Path(vqa_root)
    names = (
        (f"v2_OpenEnded_mscoco_{subset}_questions.json", "Questions"),
        (f"v2_mscoco_{subset}_annotations.json", "Annotations"),
    )
    found = []
    for name, folder in names:
        candidates = [root / name, root / folder / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{root}: VQA v2 file {name} not found (looked in {root} and {root / folder})")
        found.append(path)
    return found[0], found[1]


def image_name(subset: str, image_id: int) -> str:
    """The authors' image identifier, e.g. ``COCO_val2014_000000000042``."""
    return f"COCO_{subset}_{int(image_id):012d}"


def _drop_human_answers(obj: dict) -> dict | None:
    """JSON object hook: the ten human answers of each annotation are never used, so free them while
    parsing (they are most of an annotation file's objects)."""
    return None if "answer_id" in obj else obj


def _load_json(path: Path, key: str, hook=None) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f, object_hook=hook)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
        raise DataError(f"{path}: expected an object with a {key!r} list (the VQA v2 format)")
    return raw[key]


def read_subset(
    vqa_root: str | Path, subset: str, counts: dict | None = None
) -> Iterator[tuple[str, str, str]]:
    """(question, answer, image name) of one subset's number/other instances, in annotation-file order.

    ``counts`` (if given) is updated with the instances read and kept, for the build report.
    """
    q_path, a_path = vqa_files(vqa_root, subset)
    question_of: dict[int, str] = {}
    for i, q in enumerate(_load_json(q_path, "questions")):
        try:
            question_of[q["question_id"]] = q["question"]
        except (KeyError, TypeError):
            raise DataError(f"{q_path}: questions[{i}] lacks 'question_id' or 'question'") from None
    annotations = _load_json(a_path, "annotations", _drop_human_answers)
    seen: set[int] = set()
    kept = 0
    for i, ann in enumerate(annotations):
        try:
            qid, answer_type = ann["question_id"], ann["answer_type"]
            answer, image_id = ann["multiple_choice_answer"], ann["image_id"]
        except (KeyError, TypeError):
            raise DataError(
                f"{a_path}: annotations[{i}] lacks one of question_id, answer_type, "
                "multiple_choice_answer, image_id"
            ) from None
        if qid in seen:
            raise DataError(f"{a_path}: annotations[{i}]: question_id {qid} occurs twice")
        seen.add(qid)
        if answer_type not in KEPT_ANSWER_TYPES:
            continue
        if qid not in question_of:
            raise DataError(f"{a_path}: annotations[{i}]: question_id {qid} is not in {q_path}")
        kept += 1
        yield question_of[qid], answer, image_name(subset, image_id)
    if counts is not None:
        counts[subset] = {"annotations": len(annotations), "number_or_other": kept}


def read_vqa_instances(vqa_root: str | Path, counts: dict | None = None) -> Iterator[tuple[str, str, str]]:
    """The instances of train2014 and then val2014 (steps 1-3 of the recipe, in the authors' order)."""
    for subset in SUBSETS:
        yield from read_subset(vqa_root, subset, counts)


def build_meta_vqa_tasks(vqa_root: str | Path, seed: int = SEED) -> tuple[list[Task], list[Task], dict]:
    """The whole recipe on a VQA v2 folder: (meta-train tasks, meta-test tasks, report with statistics)."""
    counts: dict = {}
    tasks, report = build_tasks(read_vqa_instances(vqa_root, counts), seed, MIN_IMAGES)
    report["dropped"] = {reason: len(qs) for reason, qs in report["dropped"].items()}
    if len(tasks) < 2:
        raise DataError(f"{vqa_root}: the recipe leaves {len(tasks)} task(s); a split needs at least 2")
    train, test = split_tasks(tasks, seed)
    report = {
        "instances": counts,
        **report,
        "meta_train": len(train),
        "meta_test": len(test),
        "statistics": {"meta_train": task_statistics(train), "meta_test": task_statistics(test)},
    }
    log.info(
        "%s: %d questions → %d tasks (%d meta-train, %d meta-test)",
        vqa_root,
        report["questions"],
        len(tasks),
        len(train),
        len(test),
    )
    return train, test, report
