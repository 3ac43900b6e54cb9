"""Meta-VQA task files: loading, validation, the authors' split recipe and statistics.

A task file keeps the authors' schema so their published files load unchanged::

    {question: {"train": [[image_id, answer], ...], "test": [...], "answers": [a_1, ..., a_K]}}

``"train"`` is the support set, ``"test"`` the query set, and an example's label is the index of its
answer in ``"answers"``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meta_vqa.errors import DataError
from meta_vqa.io import read_json, write_json


@dataclass(frozen=True)
class Task:
    """One multiple-choice visual question with its labelled support and query examples."""

    question: str
    answers: tuple[str, ...]
    support: tuple[tuple[str, int], ...]  # (image_id, label)
    query: tuple[tuple[str, int], ...]

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def to_json(self) -> dict:
        return {
            "train": [[img, self.answers[y]] for img, y in self.support],
            "test": [[img, self.answers[y]] for img, y in self.query],
            "answers": list(self.answers),
        }


def _parse_pairs(pairs: object, where: str, answer_index: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    if not isinstance(pairs, list):
        raise DataError(f"{where}: expected a list of [image_id, answer] pairs, got {type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{where}[{i}]: expected [image_id, answer] (two strings), got {pair!r}")
        img, ans = pair
        if ans not in answer_index:
            raise DataError(f'{where}[{i}]: answer {ans!r} is not in "answers"')
        out.append((img, answer_index[ans]))
    return tuple(out)


def parse_task(question: str, entry: object, source: str = "<memory>") -> Task:
    """Validate one task entry of the authors' schema and return it as a :class:`Task`."""
    where = f"{source}: task {question!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with keys train, test, answers")
    missing = [k for k in ("train", "test", "answers") if k not in entry]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}")
    answers = entry["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f'{where}: "answers" must be a list of strings')
    if len(set(answers)) != len(answers):
        raise DataError(f'{where}: "answers" has duplicates')
    if len(answers) < 2:
        raise DataError(f"{where}: a task needs at least 2 answers, has {len(answers)}")
    index = {a: i for i, a in enumerate(answers)}
    support = _parse_pairs(entry["train"], f'{where} "train"', index)
    query = _parse_pairs(entry["test"], f'{where} "test"', index)
    if not support:
        raise DataError(f'{where}: "train" (support) is empty')
    if not query:
        raise DataError(f'{where}: "test" (query) is empty')
    return Task(question, tuple(answers), support, query)


def load_tasks(path: str | Path) -> list[Task]:
    """Load and validate a task file; errors name the file and the task."""
    path = Path(path)
    raw = read_json(path, "task file")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object mapping questions to tasks")
    if not raw:
        raise DataError(f"{path}: no tasks")
    return [parse_task(q, entry, str(path)) for q, entry in raw.items()]


def save_tasks(path: str | Path, tasks: Iterable[Task]) -> None:
    """Write tasks in the authors' schema, atomically."""
    write_json(path, {t.question: t.to_json() for t in tasks}, indent=None)


def load_prompts(path: str | Path, questions: Iterable[str] | None = None) -> dict[str, str]:
    """Load ``{question: template}``; each template has exactly one ``{}`` slot for the answer."""
    path = Path(path)
    raw = read_json(path, "prompt file")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object mapping questions to templates")
    for q, tpl in raw.items():
        if not isinstance(tpl, str) or tpl.count("{}") != 1:
            raise DataError(f"{path}: template of {q!r} must be a string with one '{{}}' slot, got {tpl!r}")
    for q in questions or ():
        if q not in raw:
            raise DataError(f"{path}: no prompt template for task {q!r}")
    return raw


def fill_prompt(template: str, answer: str) -> str:
    """The answer prompt: the question's template filled with the answer (underscores as spaces)."""
    return template.replace("{}", answer.replace("_", " "))


# --- the authors' recipe: tasks, support/query split per answer, task split -------------------------


def split_support_query(
    images_by_answer: Mapping[str, Sequence[str]], seed: int = 2021, support_fraction: float = 0.7
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Per answer: shuffle with a fresh ``random.Random(seed)``, first ``round(f·n)`` go to support.

    Lists are concatenated over answers in answer order, as the authors did.
    """
    support, query = [], []
    for answer, images in images_by_answer.items():
        imgs = list(images)
        random.Random(seed).shuffle(imgs)
        n_support = round(support_fraction * len(imgs))
        support += [(img, answer) for img in imgs[:n_support]]
        query += [(img, answer) for img in imgs[n_support:]]
    return support, query


MIN_IMAGES = 21  # a task needs more than 20 images


def build_tasks(
    qa: Iterable[tuple[str, str, str]], seed: int = 2021, min_images: int = MIN_IMAGES
) -> tuple[list[Task], dict]:
    """The authors' task recipe on (question, answer, image) triples, in the order given.

    One task per exact question string; an image counts once per question (its first occurrence wins,
    whatever a later answer says); answers with fewer than 2 images are dropped; a question is kept with at
    least ``min_images`` images, at least 2 answers and no whitespace token "or" (which removes "A or B?"
    questions); each kept answer's images are split by :func:`split_support_query`. Tasks come out in the
    order of their question's first triple, answers in the order of their first kept image.

    Returns the tasks and a report: ``{"questions", "tasks", "dropped": {reason: [question, ...]}}``.
    """
    by_question: dict[str, dict[str, list[str]]] = {}
    seen: dict[str, set[str]] = {}
    for q, a, img in qa:
        images = seen.setdefault(q, set())
        if img in images:
            continue
        images.add(img)
        by_question.setdefault(q, {}).setdefault(a, []).append(img)
    tasks: list[Task] = []
    dropped: dict[str, list[str]] = {"too_few_images": [], "too_few_answers": [], "or_question": []}
    for q, images_by_answer in by_question.items():
        kept = {a: imgs for a, imgs in images_by_answer.items() if len(imgs) >= 2}
        if "or" in q.split():
            dropped["or_question"].append(q)
        elif sum(len(v) for v in kept.values()) < min_images:
            dropped["too_few_images"].append(q)
        elif len(kept) < 2:
            dropped["too_few_answers"].append(q)
        else:
            answers = tuple(kept)
            index = {a: i for i, a in enumerate(answers)}
            support, query = split_support_query(kept, seed)
            labelled = [tuple((i, index[a]) for i, a in pairs) for pairs in (support, query)]
            tasks.append(Task(q, answers, *labelled))
    return tasks, {"questions": len(by_question), "tasks": len(tasks), "dropped": dropped}


def split_tasks(tasks: Sequence[Task], seed: int = 2021, train_fraction: float = 0.7) -> tuple[list, list]:
    """Shuffle the task list with a fresh ``random.Random(seed)``; first ``round(f·n)`` are meta-train."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    n_train = round(train_fraction * len(order))
    return order[:n_train], order[n_train:]


def task_statistics(tasks: Sequence[Task]) -> dict:
    """The statistics the paper reports for a task set (tasks, pairs, sizes, chance and majority)."""
    if not tasks:
        return {"tasks": 0}
    n_ans = [t.num_answers for t in tasks]
    n_sup = [len(t.support) for t in tasks]
    n_qry = [len(t.query) for t in tasks]
    majority = []
    hits = 0
    for t in tasks:
        counts = [0] * t.num_answers
        for _, y in t.support:
            counts[y] += 1
        top = max(range(t.num_answers), key=lambda k: counts[k])  # first maximum, like argmax
        correct = sum(1 for _, y in t.query if y == top)
        majority.append(correct / len(t.query))
        hits += correct
    images = {img for t in tasks for img, _ in t.support + t.query}
    return {
        "tasks": len(tasks),
        "pairs": sum(n_sup) + sum(n_qry),
        "support_pairs": sum(n_sup),
        "query_pairs": sum(n_qry),
        "answers_per_task": {
            "mean": statistics.fmean(n_ans),
            "median": statistics.median(n_ans),
            "min": min(n_ans),
            "max": max(n_ans),
        },
        "support_size": {
            "mean": statistics.fmean(n_sup),
            "median": statistics.median(n_sup),
            "min": min(n_sup),
            "max": max(n_sup),
        },
        "query_size": {
            "mean": statistics.fmean(n_qry),
            "median": statistics.median(n_qry),
            "min": min(n_qry),
            "max": max(n_qry),
        },
        "unique_images": len(images),
        "chance_accuracy": statistics.fmean(1 / k for k in n_ans),
        "majority_accuracy": statistics.fmean(majority),
        "majority_accuracy_pooled": hits / sum(n_qry),
    }
