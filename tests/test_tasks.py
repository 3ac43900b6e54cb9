"""Task files: the real Meta-VQA files load unchanged; malformed files fail with a message naming the task."""

import json

import pytest

from meta_vqa.data.tasks import (
    Task,
    fill_prompt,
    load_prompts,
    load_tasks,
    save_tasks,
    split_support_query,
    split_tasks,
    task_statistics,
)
from meta_vqa.errors import DataError


def test_real_meta_vqa_files_load_with_the_papers_counts(meta_vqa_files):
    train = load_tasks(meta_vqa_files / "meta_train.json")
    test = load_tasks(meta_vqa_files / "meta_test.json")
    assert (len(train), len(test)) == (870, 373)
    s_train, s_test = task_statistics(train), task_statistics(test)
    assert s_train["pairs"] + s_test["pairs"] == 104_112
    assert (s_train["pairs"], s_test["pairs"]) == (74_512, 29_600)
    assert (s_train["support_pairs"], s_test["support_pairs"]) == (51_491, 20_424)
    assert s_train["unique_images"] == 51_239
    assert round(100 * s_train["chance_accuracy"], 1) == 15.6
    assert round(100 * s_train["majority_accuracy"], 1) == 33.8
    assert round(100 * s_test["majority_accuracy_pooled"], 1) == 31.9
    prompts = load_prompts(meta_vqa_files / "prompt_meta.json", [t.question for t in train + test])
    assert fill_prompt(prompts["What color is the bowl?"], "red") == "the bowl is red"


def _write(tmp_path, obj, name="tasks.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


GOOD = {"train": [["i1", "red"], ["i2", "blue"]], "test": [["i3", "red"]], "answers": ["red", "blue"]}


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({**GOOD, "train": [["i1", "green"]]}, "answer 'green' is not in \"answers\""),
        ({**GOOD, "answers": ["red"]}, "at least 2 answers"),
        ({k: v for k, v in GOOD.items() if k != "test"}, "missing key 'test'"),
        ({**GOOD, "train": [["i1"]]}, "expected [image_id, answer]"),
        ({**GOOD, "test": []}, "query) is empty"),
        ("not a dict", "expected an object"),
    ],
)
def test_malformed_task_names_file_and_task(tmp_path, entry, needle):
    p = _write(tmp_path, {"What color?": entry})
    with pytest.raises(DataError) as e:
        load_tasks(p)
    assert str(p) in str(e.value) and "'What color?'" in str(e.value) and needle in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_tasks(p)
    with pytest.raises(DataError, match="not found"):
        load_tasks(tmp_path / "absent.json")


def test_round_trip_keeps_the_schema(tmp_path):
    t = Task("q?", ("a", "b"), (("x", 0), ("y", 1)), (("z", 1),))
    save_tasks(tmp_path / "t.json", [t])
    assert json.loads((tmp_path / "t.json").read_text()) == {
        "q?": {"train": [["x", "a"], ["y", "b"]], "test": [["z", "b"]], "answers": ["a", "b"]}
    }
    assert load_tasks(tmp_path / "t.json") == [t]


def test_recipe_splits_match_a_hand_computation():
    import random

    imgs = [f"i{i}" for i in range(10)]
    support, query = split_support_query({"a": imgs, "b": imgs[:3]}, seed=2021)
    expected = list(imgs)
    random.Random(2021).shuffle(expected)
    assert [i for i, a in support if a == "a"] == expected[:7]
    assert [i for i, a in query if a == "a"] == expected[7:]
    assert len([1 for _, a in support if a == "b"]) == round(0.7 * 3) == 2
    tasks = [Task(f"q{i}", ("a", "b"), (("x", 0),), (("y", 1),)) for i in range(10)]
    train, test = split_tasks(tasks, seed=2021)
    assert len(train) == 7 and len(test) == 3 and not {t.question for t in train} & {t.question for t in test}
