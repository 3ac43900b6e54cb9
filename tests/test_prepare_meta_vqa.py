"""The Meta-VQA builders: the authors' recipe on VQA v2, the safe import of their pickled features, the
resumable open_clip encoding, synthetic features for the real task files and the ``prepare`` entry point."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from meta_vqa.errors import DataError
from meta_vqa.prepare import vqa_recipe

# --- a hand-made VQA v2 folder that exercises every rule of the recipe -----------------------------

A = "What color is the bus?"  # kept; "or" inside "color" is no token
A_LOWER = "what color is the bus?"  # another exact string: its own task
B = "How many dogs are there?"  # 20 images once a 1-image answer is dropped: out
C = "How many cats are there?"  # exactly 21 images: in
D = "What is the man holding?"  # one answer left: out
E = "Is the bus red or blue?"  # "or" question: out
G = "What sport is this?"  # first seen in val2014: after every train2014 question


def _images(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def vqa_instances() -> dict[str, list[tuple[str, str, int, str]]]:
    """(question, answer, image_id, answer_type) per subset, in annotation-file order."""
    train = [(C, "1", i, "number") for i in _images(400, 11)]
    train += [(A, "red", i, "other") for i in _images(1, 9)]
    train += [(A, "yes", i, "yes/no") for i in (301, 302)]  # same string, yes/no type: dropped
    train += [(A, "blue", i, "other") for i in _images(101, 10)]
    train += [(A, "green", 201, "other")]  # one image: the answer is dropped
    train += [(A, "blue", 1, "other")]  # image 1 again: its first occurrence ("red") wins
    train += [(C, "2", i, "number") for i in _images(420, 10)]
    train += [(B, "2", i, "number") for i in _images(500, 10)] + [
        (B, "3", i, "number") for i in _images(520, 10)
    ]
    train += [(B, "4", 540, "number")]
    train += [(D, "bat", i, "other") for i in _images(600, 25)] + [(D, "ball", 700, "other")]
    val = [(A, "red", i, "other") for i in (1, 2, 3)]  # val2014 image 1 is another image than train's
    val += [(A_LOWER, "white", i, "other") for i in _images(800, 5)]
    val += [(A_LOWER, "black", i, "other") for i in _images(810, 16)]
    val += [(E, "red", i, "other") for i in _images(900, 12)] + [
        (E, "blue", i, "other") for i in _images(920, 12)
    ]
    val += [(G, "tennis", i, "other") for i in _images(1000, 15)] + [
        (G, "baseball", i, "other") for i in _images(1020, 8)
    ]
    return {"train2014": train, "val2014": val}


def write_vqa_root(root: Path) -> Path:
    """The VQA v2 json files of :func:`vqa_instances` (questions file in reverse order: the recipe must
    follow the annotation file) and a prompt file."""
    root.mkdir(parents=True, exist_ok=True)
    for s, (subset, rows) in enumerate(vqa_instances().items()):
        qids = [1_000_000 * (s + 1) + k for k in range(len(rows))]
        questions = [
            {"image_id": i, "question": q, "question_id": qid} for qid, (q, _, i, _) in zip(qids, rows)
        ]
        annotations = [
            {
                "question_id": qid,
                "image_id": i,
                "answer_type": t,
                "question_type": "what",
                "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
            }
            for qid, (_, a, i, t) in zip(qids, rows)
        ]
        (root / f"v2_OpenEnded_mscoco_{subset}_questions.json").write_text(
            json.dumps({"questions": questions[::-1]})
        )
        (root / f"v2_mscoco_{subset}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    prompts = {
        A: "the bus is {}",
        A_LOWER: "the bus is {}",
        C: "{} cats are there",
        G: "this is {}",
        E: "it is {}",
    }
    (root / "prompt_meta.json").write_text(json.dumps(prompts))
    return root


def _names(subset: str, ids: list[int]) -> list[str]:
    return [f"COCO_{subset}_{i:012d}" for i in ids]


def _hand_split(images: list[str]) -> tuple[list[str], list[str]]:
    shuffled = list(images)
    random.Random(2021).shuffle(shuffled)
    k = round(0.7 * len(images))
    return shuffled[:k], shuffled[k:]


@pytest.fixture
def vqa_root(tmp_path) -> Path:
    return write_vqa_root(tmp_path / "vqa")


def test_recipe_applies_every_rule(vqa_root):
    instances = list(vqa_recipe.read_vqa_instances(vqa_root))
    assert all(a != "yes" for _, a, _ in instances)  # yes/no instances never leave the reader
    tasks, report = vqa_recipe.build_tasks(instances)
    by_q = {t.question: t for t in tasks}
    # first appearance walking train2014 then val2014 annotations; B (20 images), D, E dropped
    assert [t.question for t in tasks] == [C, A, A_LOWER, G]
    assert report["dropped"] == {"or_question": 1, "too_few_images": 1, "too_few_answers": 1}
    assert report["questions"] == 7

    a = by_q[A]
    assert a.answers == ("red", "blue")  # "green" had one image, "yes" was a yes/no instance
    red = _names("train2014", _images(1, 9)) + _names("val2014", [1, 2, 3])
    blue = _names("train2014", _images(101, 10))  # train image 1 stays "red"
    (red_s, red_q), (blue_s, blue_q) = _hand_split(red), _hand_split(blue)
    assert a.support == tuple((i, 0) for i in red_s) + tuple((i, 1) for i in blue_s)
    assert a.query == tuple((i, 0) for i in red_q) + tuple((i, 1) for i in blue_q)
    assert (len(red_s), len(blue_s)) == (8, 7)

    assert len(by_q[C].support) + len(by_q[C].query) == 21  # exactly 21: kept
    lower = by_q[A_LOWER]  # exact-string grouping: the lower-case question is its own task
    assert lower.answers == ("white", "black")
    assert sum(1 for _, y in lower.support if y == 0) == 4  # round(0.7 * 5) = round(3.5) = 4
    assert by_q[G].answers == ("tennis", "baseball")


def test_threshold_is_more_than_20_images():
    rows = [("q1?", "x", f"img{i}") for i in range(10)] + [("q1?", "y", f"img{i}") for i in range(10, 20)]
    rows += [("q2?", "x", f"img{i}") for i in range(11)] + [("q2?", "y", f"img{i}") for i in range(11, 21)]
    tasks, report = vqa_recipe.build_tasks(rows)
    assert [t.question for t in tasks] == ["q2?"] and report["dropped"]["too_few_images"] == 1


def test_task_split_is_the_authors_shuffle(vqa_root):
    train, test, report = vqa_recipe.build_meta_vqa_tasks(vqa_root)
    order = [C, A, A_LOWER, G]
    random.Random(2021).shuffle(order)
    assert [t.question for t in train] == order[:3] and [t.question for t in test] == order[3:]
    assert report["instances"]["train2014"] == {"annotations": 91, "number_or_other": 89}
    assert report["statistics"]["meta_train"]["tasks"] == 3


def test_recipe_errors_name_the_file(tmp_path, vqa_root):
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_train2014_questions.json not found"):
        list(vqa_recipe.read_vqa_instances(tmp_path / "absent"))
    ann = vqa_root / "v2_mscoco_val2014_annotations.json"
    raw = json.loads(ann.read_text())
    del raw["annotations"][3]["multiple_choice_answer"]
    ann.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"v2_mscoco_val2014_annotations.json: annotations\[3\] lacks"):
        list(vqa_recipe.read_vqa_instances(vqa_root))
