"""Meta-EasyVQA: rule table, recipe, splits, image captions and a tiny end-to-end ``prepare``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from meta_vqa.data import easy_vqa_questions as rules  # noqa: E402
from meta_vqa.data.features import MANIFEST, FeatureStore, read_manifest, verify_manifest  # noqa: E402
from meta_vqa.data.tasks import fill_prompt, load_prompts, load_tasks, split_tasks  # noqa: E402
from meta_vqa.errors import DataError  # noqa: E402
from meta_vqa.io import sha256_file  # noqa: E402
from meta_vqa.nets.clip import ClipConfig, load_clip  # noqa: E402
from meta_vqa.prepare import easy_vqa as ev  # noqa: E402
from meta_vqa.prepare.staging import staging_dir  # noqa: E402


@pytest.fixture(scope="module")
def package() -> ev.PackageData:
    return ev.load_package()


def _is_negated(question: str) -> bool:
    """An oracle independent of the rule table: the question negates with "not" or "is no"."""
    words = question.rstrip("?").split()
    return "not" in words or words[:2] == ["is", "no"]


def test_package_as_documented(package: ev.PackageData) -> None:
    assert len(package.qa) == 48_248 and len(package.image_paths) == 5_000
    assert len({q for q, _, _ in package.qa}) == 107
    assert {"train/0", "test/0", "train/3999", "test/999"} <= set(package.image_paths)
    assert len(package.colors) == 8


def test_every_question_has_a_template_and_family(package: ev.PackageData) -> None:
    answers: dict[str, set[str]] = {}
    for q, a, _ in package.qa:
        answers.setdefault(q, set()).add(a)
    for q, seen in answers.items():
        template = rules.prompt_template(q)
        assert template.count("{}") == 1, q
        assert rules.question_family(q) in rules.FAMILIES
        filled = {a: fill_prompt(template, a) for a in seen}
        assert all("{" not in s and "?" not in s and s.split()[-1] for s in filled.values())
        assert len(set(filled.values())) == len(seen), q  # answers stay distinguishable
        if _is_negated(q):
            assert "not" in template.split() or "no" in template.split(), template
    assert rules.prompt_template("What color is the bowl?") == "the bowl is {}"
    assert rules.prompt_template("what is the blue shape?") == "the blue shape is a {}"
    assert fill_prompt(rules.prompt_template("is there not a circle?"), "yes") == (
        "the answer to whether there is not a circle is yes"
    )


def test_question_without_rule_raises_naming_it() -> None:
    with pytest.raises(DataError, match="'how many shapes are there\\?' matches no rule"):
        rules.prompt_template("how many shapes are there?")


def test_build_tasks_follows_the_recipe() -> None:
    qa = [("q?", "a", f"i{i}") for i in range(15)] + [("q?", "b", f"j{i}") for i in range(6)]
    qa += [("q?", "a", "i0"), ("q?", "c", "k0")]  # a repeated image and a single-image answer
    qa += [("small?", "a", f"i{i}") for i in range(10)] + [("small?", "b", f"j{i}") for i in range(10)]
    qa += [("red or blue?", "a", f"i{i}") for i in range(15)] + [
        ("red or blue?", "b", f"j{i}") for i in range(15)
    ]
    qa += [("one?", "a", f"i{i}") for i in range(25)] + [("one?", "b", "k0")]
    tasks, report = ev.build_tasks(qa, seed=3)
    assert [t.question for t in tasks] == ["q?"]
    assert report["dropped"] == {
        "too_few_images": ["small?"],
        "too_few_answers": ["one?"],
        "or_question": ["red or blue?"],
    }
    (task,) = tasks
    assert task.answers == ("a", "b")  # order of first appearance; "c" had one image
    assert (len(task.support), len(task.query)) == (round(0.7 * 15) + round(0.7 * 6), 15 - 10 + 6 - 4)
    images = [i for i, _ in task.support + task.query]
    assert len(images) == len(set(images)) == 21


def test_splits_are_deterministic_and_disjoint(package: ev.PackageData) -> None:
    tasks, report = ev.build_tasks(package.qa, seed=2021)
    assert report["tasks"] == len(tasks) == 107
    again, _ = ev.build_tasks(package.qa, seed=2021)
    assert [t.to_json() for t in tasks] == [t.to_json() for t in again]
    train, test = split_tasks(tasks, 2021)
    train2, test2 = split_tasks(again, 2021)
    assert [t.question for t in train] == [t.question for t in train2]
    assert (len(train), len(test)) == (75, 32)
    assert not {t.question for t in train} & {t.question for t in test}
    assert [t.question for t in split_tasks(tasks, 7)[0]] != [t.question for t in train]
    for t in tasks:  # support and query are disjoint inside each task
        assert not {i for i, _ in t.support} & {i for i, _ in t.query}


def test_family_split_holds_out_exactly_the_negated_questions(package: ev.PackageData) -> None:
    tasks, _ = ev.build_tasks(package.qa)
    train, test = ev.family_split(tasks)
    assert {t.question for t in test} == {t.question for t in tasks if _is_negated(t.question)}
    assert len(test) == 44 and len(train) == 63
    with pytest.raises(DataError, match="unknown question family 'colour'"):
        ev.family_split(tasks, ["colour"])


def test_image_captions_agree_with_the_answers(package: ev.PackageData) -> None:
    attrs = ev.image_attributes(package)
    assert sum(bool(c and s) for c, s in attrs.values()) > 4_400
    checked = 0
    for q, a, img in package.qa:
        if q == "what color is the shape?":
            assert attrs[img][0] == a
            checked += 1
        elif q == "what shape is present?":
            assert attrs[img][1] == a
            checked += 1
        elif q == "is there not a circle?" and a == "yes":
            assert attrs[img][1] != "circle"
    assert checked > 3_000


# --- a tiny end-to-end prepare ----------------------------------------------------------------------

TINY = {
    "max_images": 400,
    "clip_epochs": 3,
    "clip_batch_size": 32,
    "clip_lr": 5e-3,
    "clip_config": ClipConfig(width=32, layers=1, head_width=16),
    "progress": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("easy_vqa")
    logs = root / "logs"
    summary = ev.prepare_easy_vqa(root / "data", log_dir=logs, **TINY)
    return root / "data", summary, logs


def test_tiny_prepare_builds_a_loadable_dataset(tiny) -> None:
    out, summary, logs = tiny
    manifest = read_manifest(out)
    assert not summary["reused"] and verify_manifest(out) == []
    assert manifest["encoder"] == ev.ENCODER and manifest["dim"] == manifest["question_dim"] == 384
    store = FeatureStore.load(out, ev.ENCODER, dim=manifest["dim"])
    assert len(store.image_ids) == 400 and store.images.dtype == torch.float32
    index = {q: i for i, q in enumerate(store.questions)}
    splits = [out / "meta_train.json", out / "meta_test.json", out / "family/meta_train.json"]
    splits.append(out / "family/meta_test.json")
    tasks = {p.name + str(p.parent): load_tasks(p) for p in splits}
    questions = set()
    for split in tasks.values():
        for t in split:
            questions.add(t.question)
            assert store.answers[index[t.question]] == list(t.answers)
            assert {i for i, _ in t.support + t.query} <= set(store.image_ids)
    assert questions == set(store.questions) and len(questions) == summary["counts"]["tasks"]
    prompts = load_prompts(out / "prompts.json", questions)
    families = json.loads((out / "families.json").read_text())
    assert {q for q in questions if families[q] == "negated_presence"} == {
        t.question for t in load_tasks(out / "family/meta_test.json")
    }
    assert set(prompts) == set(families)
    assert summary["clip"]["retrieval_accuracy"] > 1 / 24 + 0.05  # above chance among 24 captions
    assert len(list((logs / "clip").iterdir())) == 1  # one TensorBoard run


def test_tiny_features_match_a_reloaded_clip(tiny) -> None:
    out, _, _ = tiny
    clip = load_clip(out)
    store = FeatureStore.load(out, ev.ENCODER)
    row = store.image_ids.index("test/3")
    image = Image.open(ev.load_package(400).image_paths["test/3"])
    with torch.no_grad():
        feat = clip.model.encode_image(clip.preprocess(image)[None])[0]
        question = clip.model.encode_text(clip.tokenizer([store.questions[0]]))[0]
    torch.testing.assert_close(feat, store.images[row], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(question, store.question_features[0], atol=1e-4, rtol=1e-4)


def test_second_prepare_reuses(tiny) -> None:
    out, _, logs = tiny
    start = time.perf_counter()
    summary = ev.prepare_easy_vqa(out, log_dir=logs, **TINY)
    assert summary["reused"] and time.perf_counter() - start < 2.0
    assert len(list((logs / "clip").iterdir())) == 1  # nothing was retrained


def test_partial_folder_reuses_the_trained_clip(tiny) -> None:
    out, _, logs = tiny
    weights = sha256_file(out / "clip/model.safetensors")
    # as if a build had died while encoding: its folder beside out holds the trained CLIP, no manifest
    (out / MANIFEST).unlink()
    out.rename(staging_dir(out))
    summary = ev.prepare_easy_vqa(out, log_dir=logs, **TINY)
    assert not summary["reused"] and summary["clip"]["reused"]
    assert not staging_dir(out).exists()
    assert sha256_file(out / "clip/model.safetensors") == weights and verify_manifest(out) == []
    assert len(list((logs / "clip").iterdir())) == 1
    # Other options rebuild the dataset; a changed file is noticed and rebuilt too.
    summary = ev.prepare_easy_vqa(
        out, log_dir=logs, **{**TINY, "held_out_families": ["negated_presence", "color"]}
    )
    assert not summary["reused"] and summary["families"]["held_out"] == ["negated_presence", "color"]
    (out / "prompts.json").write_text("{}")
    summary = ev.prepare_easy_vqa(out, log_dir=logs, **TINY)
    assert not summary["reused"] and verify_manifest(out) == []
    assert json.loads((out / "prompts.json").read_text())


def test_prepare_refuses_a_foreign_folder(tmp_path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"builder": "vqa-v2"}))
    with pytest.raises(DataError, match="holds a 'vqa-v2' dataset"):
        ev.prepare_easy_vqa(tmp_path, **TINY)
    with pytest.raises(DataError, match="unknown question family"):
        ev.prepare_easy_vqa(tmp_path / "new", held_out_families=["nope"], **TINY)
