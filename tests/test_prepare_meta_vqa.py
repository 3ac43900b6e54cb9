"""The Meta-VQA builders: the authors' recipe on VQA v2, the safe import of their pickled features, the
resumable open_clip encoding, synthetic features for the real task files and the ``prepare`` entry point."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from meta_vqa.data.tasks import build_tasks, load_tasks
from meta_vqa.errors import ConfigError, DataError
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
    tasks, report = build_tasks(instances)
    by_q = {t.question: t for t in tasks}
    # first appearance walking train2014 then val2014 annotations; B (20 images), D, E dropped
    assert [t.question for t in tasks] == [C, A, A_LOWER, G]
    assert {k: len(v) for k, v in report["dropped"].items()} == {
        "or_question": 1,
        "too_few_images": 1,
        "too_few_answers": 1,
    }
    assert report["dropped"]["too_few_images"] == [B]
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
    tasks, report = build_tasks(rows)
    assert [t.question for t in tasks] == ["q2?"] and report["dropped"]["too_few_images"] == ["q1?"]


def test_task_split_is_the_authors_shuffle(vqa_root):
    train, test, report = vqa_recipe.build_meta_vqa_tasks(vqa_root)
    order = [C, A, A_LOWER, G]
    random.Random(2021).shuffle(order)
    assert [t.question for t in train] == order[:3] and [t.question for t in test] == order[3:]
    assert report["instances"]["train2014"] == {"annotations": 91, "number_or_other": 89}
    assert report["statistics"]["meta_train"]["tasks"] == 3


def test_the_published_files_follow_the_recipes_splits(meta_vqa_files):
    """ques_ans_count.json lists the tasks in the recipe's order before the task split: shuffling that
    order as the recipe does must give the published meta-train and meta-test files, key order included;
    support and query lists run over the answers in order; each answer's support share is round(0.7 n)."""
    from meta_vqa.data.tasks import split_tasks

    counts = json.loads((meta_vqa_files / "ques_ans_count.json").read_text())
    train = load_tasks(meta_vqa_files / "meta_train.json")
    test = load_tasks(meta_vqa_files / "meta_test.json")
    split_train, split_test = split_tasks(list(counts), seed=vqa_recipe.SEED)
    assert split_train == [t.question for t in train] and split_test == [t.question for t in test]
    for t in train + test:
        assert tuple(counts[t.question]) == t.answers
        for part in (t.support, t.query):  # concatenated over answers, in answer order
            assert [y for _, y in part] == sorted(y for _, y in part)
        for label, n in enumerate(counts[t.question].values()):
            assert sum(1 for _, y in t.support if y == label) == round(0.7 * n), (t.question, label)


def test_recipe_errors_name_the_file(tmp_path, vqa_root):
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_train2014_questions.json not found"):
        list(vqa_recipe.read_vqa_instances(tmp_path / "absent"))
    ann = vqa_root / "v2_mscoco_val2014_annotations.json"
    raw = json.loads(ann.read_text())
    del raw["annotations"][3]["multiple_choice_answer"]
    ann.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"v2_mscoco_val2014_annotations.json: annotations\[3\] lacks"):
        list(vqa_recipe.read_vqa_instances(vqa_root))


# --- the authors' pickled features: restricted unpickling and import --------------------------------


def test_restricted_unpickler_reads_numpy_1_and_2_files(tmp_path):
    import numpy as np
    from make_authors_features import save_pickled

    from meta_vqa.prepare.pickles import load_feature_dict

    d = {"q?": np.arange(6, dtype=np.float32).reshape(2, 3), "r?": np.ones((1, 3), np.float64)}
    for numpy1 in (False, True):
        path = tmp_path / f"f{int(numpy1)}.npy"
        save_pickled(path, d, numpy1=numpy1)
        assert (b"numpy.core." in path.read_bytes()) is numpy1
        got = load_feature_dict(path)
        assert got.keys() == d.keys() and all(np.array_equal(got[k], d[k]) for k in d)


class _Payload:
    """Pickles as a call of ``os.system`` (what a malicious feature file would hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    import numpy as np

    from meta_vqa.prepare.pickles import load_pickled_npy

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    np.save(path, {"img": _Payload(marker)}, allow_pickle=True)
    with pytest.raises(DataError) as e:
        load_pickled_npy(path)
    assert str(path) in str(e.value) and "posix.system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_plain_arrays_and_junk_are_not_feature_dicts(tmp_path):
    import numpy as np

    from meta_vqa.prepare.pickles import load_feature_dict

    np.save(tmp_path / "plain.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match="plain <f4 array of shape"):
        load_feature_dict(tmp_path / "plain.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="not a .npy file"):
        load_feature_dict(tmp_path / "junk.npy")
    np.save(tmp_path / "list.npy", {"k": [1, 2]}, allow_pickle=True)
    with pytest.raises(DataError, match="features of 'k' must be a 2-d float array"):
        load_feature_dict(tmp_path / "list.npy")


@pytest.fixture
def authors_set(tmp_path, vqa_root):
    """The recipe's tasks from the hand-made VQA folder and random features in the authors' format."""
    from make_authors_features import authors_feature_dicts, write_authors_features

    train, test, _ = vqa_recipe.build_meta_vqa_tasks(vqa_root)
    dicts = authors_feature_dicts(train + test, dim=12, extra_images=5)
    feats = tmp_path / "Features"
    files = write_authors_features(feats, dicts, numpy1=("questions",))
    return {
        "vqa_root": vqa_root,
        "train": train,
        "test": test,
        "dicts": dicts,
        "features": feats,
        "files": files,
    }


def test_import_from_vqa_root_writes_a_checked_dataset(tmp_path, authors_set, capsys):
    import numpy as np
    from make_authors_features import save_pickled

    from meta_vqa.data.features import FeatureStore, read_manifest
    from meta_vqa.io import sha256_file
    from meta_vqa.prepare import meta_vqa
    from meta_vqa.prepare.authors_features import ENCODER

    out = tmp_path / "data" / "meta_vqa"
    args = ["--vqa-root", str(authors_set["vqa_root"]), "--features", str(authors_set["features"])]
    assert meta_vqa.main([*args, "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["meta_train"] == 3 and summary["recipe"]["tasks"] == 4
    tasks = authors_set["train"] + authors_set["test"]
    assert load_tasks(out / "meta_train.json") == authors_set["train"]
    assert json.loads((out / "prompts.json").read_text()) == {
        t.question: json.loads((authors_set["vqa_root"] / "prompt_meta.json").read_text())[t.question]
        for t in tasks
    }  # the tasks' templates only (E's is in the prompt file, E is no task)
    store = FeatureStore.load(out, ENCODER, 12)
    d = authors_set["dicts"]
    assert len(store.image_ids) == len({i for t in tasks for i, _ in t.support + t.query})  # unused skipped
    for row in (0, len(store.image_ids) - 1):
        assert np.array_equal(store.images[row].numpy(), d["images"][store.image_ids[row]][0])
    for i, q in enumerate(store.questions):
        assert np.array_equal(store.question_features[i].numpy(), d["questions"][q][0])
        rows = store.answer_features[store.answer_offsets[i] : store.answer_offsets[i + 1]]
        assert np.array_equal(rows.numpy(), d["answers"][q])
    manifest = read_manifest(out)
    sources = manifest["features"]["sources"]
    assert {k: v["sha256"] for k, v in sources.items()} == {
        k: sha256_file(p) for k, p in authors_set["files"].items()
    }
    assert not any(p.suffix == ".npy" for p in out.rglob("*"))  # nothing downstream sees a pickle
    assert not (out.parent / ".meta_vqa.partial").exists()

    assert meta_vqa.main([*args, "--out", str(out), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True
    (out / "prompts.json").write_text("{}")  # a changed file: verified, found, rebuilt
    assert meta_vqa.main([*args, "--out", str(out), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is False
    questions = {q: 2 * v for q, v in d["questions"].items()}  # new source features: rebuilt too
    save_pickled(authors_set["files"]["questions"], questions)
    assert meta_vqa.main([*args, "--out", str(out), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is False
    store = FeatureStore.load(out, ENCODER, 12)
    assert np.array_equal(store.question_features[0].numpy(), questions[store.questions[0]][0])


def test_import_names_the_first_missing_feature(tmp_path, authors_set):
    from make_authors_features import save_pickled

    from meta_vqa.prepare.meta_vqa import prepare_meta_vqa

    d, files = authors_set["dicts"], authors_set["files"]
    task = authors_set["test"][0]
    image = task.query[-1][0]
    images = dict(d["images"])
    del images[image]
    save_pickled(files["images"], images)
    kw = {"vqa_root": authors_set["vqa_root"], "features": authors_set["features"]}
    with pytest.raises(DataError) as e:
        prepare_meta_vqa(tmp_path / "out", **kw)
    msg = str(e.value)
    assert str(files["images"]) in msg and repr(image) in msg and repr(task.question) in msg
    assert "meta_test.json" in msg and not (tmp_path / "out").exists()

    answers = dict(d["answers"])
    answers[task.question] = answers[task.question][:, :7]
    save_pickled(files["answers"], answers)
    with pytest.raises(DataError, match=r"answer-prompt features of task .* have shape \(\d+, 7\)"):
        prepare_meta_vqa(tmp_path / "out", **kw)


def test_option_errors_are_one_line(tmp_path, authors_set):
    from meta_vqa.prepare.meta_vqa import prepare_meta_vqa

    root, feats = authors_set["vqa_root"], authors_set["features"]
    with pytest.raises(ConfigError, match="exactly one of --features DIR"):
        prepare_meta_vqa(tmp_path / "o", vqa_root=root, features=feats, coco_root=tmp_path)
    with pytest.raises(ConfigError, match="exactly one of --tasks DIR"):
        prepare_meta_vqa(tmp_path / "o", features=feats)
    with pytest.raises(ConfigError, match="--coco-root .*absent: no such folder"):
        prepare_meta_vqa(tmp_path / "o", vqa_root=root, coco_root=tmp_path / "absent")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no dataset.json"):
        prepare_meta_vqa(tmp_path / "busy", vqa_root=root, features=feats)


# --- encoding with open_clip (a tiny registered model, random or file weights) -----------------------

TINY = "MetaVQA-Tiny-Test"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """Registers a tiny open_clip config under :data:`TINY`; returns a weight file for it."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = open_clip.create_model(TINY, pretrained=None)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


@pytest.fixture
def coco_set(tmp_path) -> dict:
    """Seven JPEGs (RGB and greyscale, odd sizes) in COCO's folders, two tasks and their prompts."""
    from PIL import Image

    from meta_vqa.data.tasks import Task, save_tasks

    rng = random.Random(0)
    coco = tmp_path / "coco"
    ids = [f"COCO_train2014_{i:012d}" for i in range(1, 5)] + [f"COCO_val2014_{i:012d}" for i in range(1, 4)]
    for k, img in enumerate(ids):
        mode, size = ("L", (41, 23)) if k % 3 == 0 else ("RGB", (37 + k, 50))
        pixels = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode)))
        (coco / img.split("_")[1]).mkdir(parents=True, exist_ok=True)
        Image.frombytes(mode, size, pixels).save(coco / img.split("_")[1] / f"{img}.jpg", quality=90)
    t1 = Task(
        "What color is it?", ("red", "dark_blue"), ((ids[0], 0), (ids[1], 1), (ids[2], 0)), ((ids[3], 1),)
    )
    t2 = Task("How many?", ("1", "2"), ((ids[4], 0), (ids[5], 1)), ((ids[6], 0), (ids[0], 1)))
    tasks = tmp_path / "tasks"
    save_tasks(tasks / "meta_train.json", [t1])
    save_tasks(tasks / "meta_test.json", [t2])
    (tasks / "prompt_meta.json").write_text(json.dumps({t1.question: "it is {}", t2.question: "{} things"}))
    return {"coco": coco, "tasks": tasks, "ids": sorted(ids), "task_list": [t1, t2]}


def test_preprocessing_is_the_authors_transform(coco_set):
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from meta_vqa.data.encode import images_to_input as to_model_input
    from meta_vqa.prepare.clip_encode import load_image
    from meta_vqa.prepare.vqa_recipe import SUBSETS

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    authors = T.Compose(
        [
            T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    files = [p for s in SUBSETS for p in sorted((coco_set["coco"] / s).glob("*.jpg"))]
    assert len(files) == 7
    for path in files:
        ours = to_model_input(load_image(path, 32)[None], mean, std)[0]
        with Image.open(path) as im:
            assert torch.allclose(ours, authors(im), atol=1e-5), path


def _counting(monkeypatch) -> dict:
    """Counts ``encode_image`` calls of every encoder the builder loads."""
    from meta_vqa.prepare import clip_encode

    calls = {"encode_image": 0}
    real = clip_encode.load_clip_encoder

    def load(*args, **kwargs):
        encoder = real(*args, **kwargs)
        inner = encoder.model.encode_image

        def counted(x, *a, **kw):
            calls["encode_image"] += 1
            return inner(x, *a, **kw)

        encoder.model.encode_image = counted
        return encoder

    monkeypatch.setattr(clip_encode, "load_clip_encoder", load)
    return calls


def test_killed_encoding_resumes_from_finished_shards(tmp_path, tiny_clip, coco_set, monkeypatch):
    from meta_vqa.data.features import FeatureStore
    from meta_vqa.prepare import clip_encode
    from meta_vqa.prepare.meta_vqa import prepare_meta_vqa

    out = tmp_path / "data" / "meta_vqa"
    kw = {"tasks": coco_set["tasks"], "coco_root": coco_set["coco"], "clip": TINY, "pretrained": "none"}
    kw |= {"device": "cpu", "batch_size": 2, "shard_size": 3, "workers": 0, "progress": False}
    calls = _counting(monkeypatch)
    real_write = clip_encode._write_shard
    writes = []

    def write_then_die(path, *args):
        if writes:
            raise RuntimeError("killed")
        writes.append(path.name)
        real_write(path, *args)

    monkeypatch.setattr(clip_encode, "_write_shard", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_meta_vqa(out, **kw)
    assert calls["encode_image"] == 4  # shard 0 (2 batches) written, shard 1 (2 batches) lost
    assert not out.exists()  # nothing that looks like a dataset
    shards = out.parent / ".meta_vqa.partial" / "shards"
    assert sorted(p.name for p in shards.glob("images-*")) == ["images-00000.safetensors"]

    monkeypatch.setattr(clip_encode, "_write_shard", real_write)
    calls["encode_image"] = 0
    summary = prepare_meta_vqa(out, **kw)
    assert calls["encode_image"] == 3  # shards 1 and 2 only: 2 + 1 batches
    assert summary["encoder"] == "metavqa-tiny-test-random" and summary["dim"] == 16

    calls["encode_image"] = 0
    fresh = prepare_meta_vqa(tmp_path / "fresh", **kw)  # one uninterrupted run gives the same features
    assert calls["encode_image"] == 5 and not fresh["reused"]  # 2 + 2 + 1 batches
    resumed = FeatureStore.load(out, summary["encoder"])
    whole = FeatureStore.load(tmp_path / "fresh", summary["encoder"])
    assert resumed.image_ids == whole.image_ids == coco_set["ids"]
    assert (resumed.images == whole.images).all()
    assert prepare_meta_vqa(out, **kw)["reused"] is True


def test_encoding_with_a_weight_file_matches_the_model(tmp_path, tiny_clip, coco_set):
    import open_clip
    import torch

    from meta_vqa.data.encode import images_to_input as to_model_input
    from meta_vqa.data.features import FeatureStore, read_manifest
    from meta_vqa.data.tasks import fill_prompt
    from meta_vqa.io import sha256_file
    from meta_vqa.prepare.clip_encode import load_image
    from meta_vqa.prepare.meta_vqa import main

    out = tmp_path / "out"
    args = ["--tasks", str(coco_set["tasks"]), "--coco-root", str(coco_set["coco"]), "--clip", TINY]
    args += ["--pretrained", str(tiny_clip), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert main([*args, "--out", str(out), "--batch-size", "4"]) == 0
    manifest = read_manifest(out)
    assert manifest["features"]["clip"]["weights_sha256"] == sha256_file(tiny_clip)
    assert manifest["features"]["preprocessing"]["image_size"] == 32
    assert manifest["counts"] | {"images": 7} == manifest["counts"]
    store = FeatureStore.load(out, manifest["encoder"], manifest["dim"])

    model = open_clip.create_model(TINY, pretrained=str(tiny_clip)).eval()
    tok = open_clip.get_tokenizer(TINY)
    prep = manifest["features"]["preprocessing"]
    paths = [coco_set["coco"] / i.split("_")[1] / f"{i}.jpg" for i in store.image_ids]
    pixels = torch.stack([load_image(p, 32) for p in paths])
    with torch.no_grad():
        images = model.encode_image(to_model_input(pixels, prep["mean"], prep["std"]))
        questions = model.encode_text(tok(store.questions))
        t1 = coco_set["task_list"][0]
        prompts = model.encode_text(tok([fill_prompt("it is {}", a) for a in t1.answers]))
    assert torch.allclose(store.images, images, atol=1e-5)
    assert torch.allclose(store.question_features, questions, atol=1e-5)
    row = store.questions.index(t1.question)  # "dark_blue" is encoded as "it is dark blue"
    start = int(store.answer_offsets[row])
    assert torch.allclose(store.answer_features[start : start + 2], prompts, atol=1e-5)


def test_missing_image_and_bad_settings_are_named(tmp_path, tiny_clip, coco_set):
    from meta_vqa.prepare.meta_vqa import prepare_meta_vqa

    kw = {"tasks": coco_set["tasks"], "coco_root": coco_set["coco"], "clip": TINY, "device": "cpu"}
    with pytest.raises(ConfigError, match="--precision fp16 needs a CUDA device"):
        prepare_meta_vqa(tmp_path / "o", pretrained="none", precision="fp16", **kw)
    with pytest.raises(ConfigError, match="--pretrained laion: neither a file nor a weight tag"):
        prepare_meta_vqa(tmp_path / "o", pretrained="laion", **kw)
    broken = coco_set["coco"] / "train2014" / f"{coco_set['ids'][1]}.jpg"
    broken.write_bytes(b"not a jpeg")  # decoded in a worker process; the error comes back as one line
    with pytest.raises(DataError, match=f"^{broken}: cannot read image [^\n]*$"):
        prepare_meta_vqa(tmp_path / "o", pretrained="none", workers=1, progress=False, **kw)
    missing = coco_set["ids"][-1]
    (coco_set["coco"] / "val2014" / f"{missing}.jpg").unlink()
    with pytest.raises(DataError, match=f"image '{missing}' of task 'How many\\?' not found"):
        prepare_meta_vqa(tmp_path / "o", pretrained="none", **kw)


def test_image_throughput_figures(tiny_clip):
    from meta_vqa.prepare.clip_bench import image_throughput

    figures = image_throughput(TINY, batch_size=2, batches=2, precisions=("fp32", "bf16"), device="cpu")
    keys = {"bench", "figure", "value", "unit", "baseline_value", "ratio", "device", "config"}
    assert [f["figure"] for f in figures] == ["image_encode_fp32", "image_encode_bf16"]
    assert all(set(f) == keys and f["value"] > 0 and f["unit"] == "images/s" for f in figures)
    fp32, bf16 = figures
    assert fp32["baseline_value"] is None and bf16["baseline_value"] == fp32["value"]
    assert bf16["ratio"] == pytest.approx(bf16["value"] / fp32["value"])


# --- synthetic features for the real task files ------------------------------------------------------


def test_synthetic_features_for_the_real_task_files(tmp_path, meta_vqa_files, capsys):
    import torch
    import torch.nn.functional as F

    from meta_vqa.data.datamodule import MetaVQADataModule
    from meta_vqa.prepare import synthetic_tasks

    out = tmp_path / "synthetic"
    args = ["--tasks", str(meta_vqa_files), "--dim", "64", "--out", str(out), "--seed", "3", "--json"]
    assert synthetic_tasks.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {
        "meta_train": 870,
        "meta_test": 373,
        "images": 64_665,
        "questions": 1_243,
        "answer_prompts": 11_359,
    }
    assert (out / "meta_train.json").read_bytes() == (meta_vqa_files / "meta_train.json").read_bytes()
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["What color is the bowl?"] == "the bowl is {}" and len(prompts) == 1_243

    dm = MetaVQADataModule(str(out), batch_size=4, val_fraction=0.1)
    assert (len(dm.train_tasks) + len(dm.val_tasks), len(dm.test_tasks)) == (870, 373)
    assert dm.feature_dim == dm.question_dim == 64
    batch = dm.to_batch(next(iter(dm.loader("test", batch_size=3))))
    k = int(batch.answer_mask.sum(1).max())
    assert batch.question.shape == (3, 64) and batch.answers.shape == (3, k, 64)
    assert batch.support_x.shape[::2] == (3, 64) and batch.query_x.shape[:1] == (3,)

    q = F.normalize(dm.store.question_features, dim=1)
    assert (q @ q.T).fill_diagonal_(-1).max() < 0.98  # every task's question embedding is its own

    # learnable: reading the prompts zero-shot and nearest support prototypes both beat chance by far
    store, row = dm.store, {img: i for i, img in enumerate(dm.store.image_ids)}
    chance, zero_shot, prototype = [], [], []
    for t in dm.test_tasks[:120]:
        q = store.questions.index(t.question)
        prompts_x = store.answer_features[store.answer_offsets[q] : store.answer_offsets[q + 1]]
        x = F.normalize(store.images[[row[i] for i, _ in t.query]], dim=1)
        y = torch.tensor([y for _, y in t.query])
        s = store.images[[row[i] for i, _ in t.support]]
        sy = torch.tensor([y for _, y in t.support])
        protos = torch.stack([s[sy == c].mean(0) for c in range(t.num_answers)])
        zero_shot.append((x @ F.normalize(prompts_x, dim=1).T).argmax(1).eq(y).float().mean())
        prototype.append((x @ F.normalize(protos, dim=1).T).argmax(1).eq(y).float().mean())
        chance.append(1 / t.num_answers)
    mean = lambda v: float(sum(v) / len(v))
    assert mean(zero_shot) > mean(chance) + 0.2 and mean(prototype) > mean(chance) + 0.2

    assert synthetic_tasks.main(args) == 0  # a complete, unchanged dataset is kept
    assert json.loads(capsys.readouterr().out)["reused"] is True
