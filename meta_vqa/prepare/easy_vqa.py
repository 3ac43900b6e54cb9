"""Meta-EasyVQA: the authors' Meta-VQA recipe applied to the offline ``easy-vqa`` package.

The ``easy-vqa`` package ships 5,000 64×64 images of coloured shapes and ~48k question/answer pairs over
107 distinct questions (colours, shapes, presence, and negated presence such as "is no red shape
present?"). One task per question string, as the paper built Meta-VQA from VQA v2. ``prepare_easy_vqa``
builds a complete dataset folder::

    meta_train.json, meta_test.json      random 70/30 task split (the authors' recipe)
    family/meta_train.json, family/meta_test.json   held-out question families (default: negated ones)
    prompts.json, families.json          {question: answer template}, {question: family}
    clip/model.safetensors, clip/config.json        the small CLIP that made the features
    features/easyclip-minilm/...         image, question and answer-prompt features
    dataset.json                         manifest, written last: its presence means complete

The folder is built beside ``out`` and swapped in whole (:mod:`meta_vqa.prepare.staging`), so a kill never
leaves a half-written dataset under ``out``; a kept dataset is reused only after every file was checked.

Each question's family and answer template come from the rule table of
:mod:`meta_vqa.data.easy_vqa_questions`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from meta_vqa.data.easy_vqa_questions import (
    DEFAULT_HELD_OUT,
    FAMILIES,
    SHAPES,
    YES_NO,
    prompt_template,
    question_family,
)
from meta_vqa.data.encode import encode_dataset, load_images
from meta_vqa.data.features import write_manifest
from meta_vqa.data.tasks import Task, build_tasks, save_tasks, split_tasks, task_statistics
from meta_vqa.device import check_trainer_precision
from meta_vqa.errors import ConfigError, DataError
from meta_vqa.io import write_json
from meta_vqa.nets.clip import CLIP_DIR, ClipConfig, clip_is_complete
from meta_vqa.prepare.staging import fresh_staging, publish, reusable
from meta_vqa.stages.clip import load_or_train_clip, torch_threads

log = logging.getLogger(__name__)

BUILDER = "easy-vqa"
BUILDER_VERSION = 1
ENCODER = "easyclip-minilm"


# --- the package's data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageData:
    """The easy-vqa QA pairs (package train split first, then test) and image paths, ids "train/12"."""

    qa: tuple[tuple[str, str, str], ...]  # (question, answer, image_id)
    image_paths: dict[str, str]
    colors: tuple[str, ...]


def load_package(max_images: int | None = None) -> PackageData:
    """Read the ``easy-vqa`` package; ``max_images`` keeps the lowest ids, 80 % from its train split."""
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the embedded dataset needs the 'easy-vqa' package (pip install easy-vqa)") from None
    answers = list(easy_vqa.get_answers())
    missing = [a for a in (*SHAPES, *YES_NO) if a not in answers]
    if missing:
        raise DataError(
            f"easy-vqa answers lack {missing[0]!r}; this builder does not know this package version"
        )
    colors = tuple(sorted(a for a in answers if a not in SHAPES and a not in YES_NO))
    splits = {
        "train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    }
    limit = {"train": None, "test": None}
    if max_images is not None:
        if max_images < 10:
            raise DataError(f"max_images must be at least 10, got {max_images}")
        limit["train"] = round(0.8 * max_images)
        limit["test"] = max_images - limit["train"]
    qa: list[tuple[str, str, str]] = []
    paths: dict[str, str] = {}
    for split, ((questions, ans, ids), image_paths) in splits.items():
        keep = sorted(image_paths)[: limit[split]]
        paths.update({f"{split}/{i}": str(image_paths[i]) for i in keep})
        for q, a, i in zip(questions, ans, ids):
            image_id = f"{split}/{i}"
            if image_id in paths:
                qa.append((q, a, image_id))
            elif limit[split] is None:
                raise DataError(f"easy-vqa {split} question {q!r} refers to image {i}, which has no file")
    return PackageData(tuple(qa), paths, colors)


def image_attributes(data: PackageData) -> dict[str, tuple[str | None, str | None]]:
    """Each image's (colour, shape), read off its QA pairs through the question families.

    A positive fact ("what color is the circle?" → red) sets a value; a negative one ("is there a
    circle?" → no) rules one out, and a kind left with a single candidate takes it. ``None``: unknown.
    """
    values = {"color": data.colors, "shape": SHAPES}
    kinds = {v: k for k, vs in values.items() for v in vs}
    known: dict[str, dict[str, str]] = {img: {} for img in data.image_paths}
    excluded: dict[str, set[str]] = {img: set() for img in data.image_paths}
    for q, a, img in data.qa:
        family = FAMILIES[question_family(q)]
        mentioned = [w for w in re.findall(r"\w+", q.lower()) if w in kinds]
        holds = family.mention_holds_if in (None, a)
        for word in [a, *mentioned] if holds else [a]:
            if word in kinds:
                seen = known[img].setdefault(kinds[word], word)
                if seen != word:
                    raise DataError(
                        f"easy-vqa image {img!r}: question {q!r} says {word!r}, another says {seen!r}"
                    )
        if not holds:
            excluded[img].update(mentioned)
    out = {}
    for img, facts in known.items():
        for kind, candidates in values.items():
            left = [v for v in candidates if v not in excluded[img]]
            if kind not in facts and len(left) == 1:
                facts[kind] = left[0]
            if facts.get(kind) in excluded[img]:
                raise DataError(
                    f"easy-vqa image {img!r}: {kind} {facts[kind]!r} is both stated and ruled out"
                )
        out[img] = (facts.get("color"), facts.get("shape"))
    return out


def caption(color: str, shape: str) -> str:
    """The CLIP training caption of an image, e.g. "a red circle"."""
    return f"a {color} {shape}"


def family_split(tasks: Sequence[Task], held_out: Sequence[str] = DEFAULT_HELD_OUT) -> tuple[list, list]:
    """Meta-test = every task of a held-out family, meta-train = the rest (task order kept)."""
    unknown = [f for f in held_out if f not in FAMILIES]
    if unknown:
        raise DataError(f"unknown question family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    train = [t for t in tasks if question_family(t.question) not in held_out]
    test = [t for t in tasks if question_family(t.question) in held_out]
    if not train or not test:
        raise DataError(
            f"the family split holding out {list(held_out)} leaves an empty side "
            f"({len(train)} meta-train, {len(test)} meta-test tasks)"
        )
    return train, test


# --- prepare ----------------------------------------------------------------------------------------


def clip_training_data(
    data: PackageData, image_ids: list[str], images: torch.Tensor
) -> tuple[list[str], dict]:
    """Captions and the CLIP's train (package train) / held-out (package test) images with a known caption."""
    captions = [caption(c, s) for c in data.colors for s in SHAPES]
    index = {c: i for i, c in enumerate(captions)}
    attrs = image_attributes(data)
    rows = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for row, img in enumerate(image_ids):
        color, shape = attrs[img]
        if color and shape:
            split = img.split("/")[0]
            rows[split].append(row)
            labels[split].append(index[caption(color, shape)])
    sets = {s: (images[rows[s]], torch.tensor(labels[s], dtype=torch.long)) for s in rows}
    sets["images_with_caption"] = len(rows["train"]) + len(rows["test"])
    return captions, sets


def _write_tasks(out: Path, data: PackageData, seed: int, held_out: Sequence[str]) -> dict:
    """Tasks, both splits, prompts and families; returns them for the later steps."""
    questions = list(dict.fromkeys(q for q, _, _ in data.qa))
    prompts = {q: prompt_template(q) for q in questions}
    families = {q: question_family(q) for q in questions}
    tasks, recipe = build_tasks(data.qa, seed)
    splits = {"random": split_tasks(tasks, seed), "family": family_split(tasks, held_out)}
    if not all(splits["random"]):
        raise DataError(f"{len(tasks)} tasks are too few for a meta-train/meta-test split (use more images)")
    for name, folder in (("random", out), ("family", out / "family")):
        save_tasks(folder / "meta_train.json", splits[name][0])
        save_tasks(folder / "meta_test.json", splits[name][1])
    write_json(out / "prompts.json", prompts)
    write_json(out / "families.json", families)
    sizes = [len(s) for pair in splits.values() for s in pair]
    log.info(
        "%d questions → %d tasks; random split %d/%d, family split %d/%d", len(questions), len(tasks), *sizes
    )
    recipe["dropped"] = {k: len(v) for k, v in recipe["dropped"].items()}
    return {"tasks": tasks, "splits": splits, "prompts": prompts, "families": families, "recipe": recipe}


def _manifest_info(built: dict, enc: dict, clip: dict, options: dict) -> dict:
    splits, families = built["splits"], built["families"]
    counts = {k: enc[k] for k in ("images", "questions", "answer_prompts")} | {"tasks": len(built["tasks"])}
    for name, (train, test) in splits.items():
        counts |= {f"{name}_meta_train": len(train), f"{name}_meta_test": len(test)}
    return {
        "builder": BUILDER,
        "builder_version": BUILDER_VERSION,
        "encoder": ENCODER,
        "dim": enc["dim"],
        "question_dim": enc["question_dim"],
        "seed": options["seed"],
        "options": options,
        "counts": counts,
        "splits": {
            "random": {"meta_train": "meta_train.json", "meta_test": "meta_test.json"},
            "family": {"meta_train": "family/meta_train.json", "meta_test": "family/meta_test.json"},
        },
        "recipe": built["recipe"],
        "families": {
            "held_out": options["held_out_families"],
            "questions": {f: sum(v == f for v in families.values()) for f in FAMILIES},
        },
        "statistics": {
            name: {"meta_train": task_statistics(train), "meta_test": task_statistics(test)}
            for name, (train, test) in splits.items()
        },
        "clip": clip,
    }


def _summary(out: Path, manifest: dict, reused: bool, times: dict) -> dict:
    keys = ("encoder", "dim", "question_dim", "counts", "recipe", "families", "statistics", "clip", "seed")
    return {"out": str(out), "reused": reused, **{k: manifest[k] for k in keys}, "wall_time_s": times}


def prepare_easy_vqa(
    out: str | Path = "data/easy_vqa",
    seed: int = 2021,
    force: bool = False,
    clip_epochs: int = 16,
    max_images: int | None = None,
    held_out_families: Sequence[str] = DEFAULT_HELD_OUT,
    clip_config: ClipConfig | None = None,
    clip_batch_size: int = 64,
    clip_lr: float = 2e-3,
    log_dir: str | Path = "lightning_logs",
    progress: bool = True,
    num_threads: int | None = None,
    clip_devices: int = 1,
    clip_precision: str = "32-true",
) -> dict:
    """Build (or reuse) the Meta-EasyVQA dataset folder ``out``; returns a summary of what it holds.

    Args:
        out: the dataset folder.
        seed: seed of the support/query split, the task split and CLIP training.
        force: rebuild everything even if a valid dataset (or trained CLIP) with these options exists.
        clip_epochs: CLIP training epochs (also ``clip_batch_size``, ``clip_lr``; ``clip_config``: its net).
        max_images: use only this many images (the lowest ids, 80 % package-train), for quick runs.
        held_out_families: question families that form the meta-test side of ``family/``.
        log_dir: TensorBoard folder of the CLIP run (``<log_dir>/clip/version_N``).
        progress: show progress bars.
        num_threads: torch threads for CLIP training and encoding (default: 1 on ≤ 2 cores, see
            :func:`~meta_vqa.stages.clip.torch_threads`).
        clip_devices, clip_precision: how CLIP trains (DDP over that many devices, Lightning's precision);
            not options of the dataset: a CLIP trained one way is reused the other.
    """
    start = time.perf_counter()
    out = Path(out)
    clip_config = clip_config or ClipConfig()
    unknown = [f for f in held_out_families if f not in FAMILIES]
    if unknown:
        raise DataError(f"unknown question family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    # how the CLIP trains is checked before anything is written (train_clip checks it again)
    check_trainer_precision(clip_precision, "auto", "--clip-precision")
    if clip_devices < 1 or clip_batch_size % clip_devices:
        raise ConfigError(
            f"--clip-devices: a batch of {clip_batch_size} does not split over {clip_devices} processes"
        )
    arch = {k: v for k, v in clip_config.to_json().items() if k not in ("extra", "text_weights_sha256")}
    clip_options = {"arch": arch, "epochs": clip_epochs, "batch_size": clip_batch_size, "lr": clip_lr}
    # Also what the training data and its order depend on; a new builder version retrains.
    clip_options |= {"seed": seed, "max_images": max_images, "builder_version": BUILDER_VERSION}
    options = {"seed": seed, "max_images": max_images, "held_out_families": list(held_out_families)}
    options["clip"] = clip_options
    options = json.loads(json.dumps(options))  # as stored (tuples become lists), so reruns compare equal
    clip_options = options["clip"]
    kept = reusable(out, BUILDER, BUILDER_VERSION, options, force)
    if kept is not None:
        log.info("%s: dataset complete and valid, reusing it", out)
        return _summary(out, kept, True, {"total": time.perf_counter() - start})
    # built beside out and swapped in whole; a CLIP trained by an interrupted build, or the kept
    # dataset's, is reused if it was trained with these options (load_or_train_clip checks)
    staging = fresh_staging(out, keep=() if force else (CLIP_DIR,))
    if not force and not (staging / CLIP_DIR).exists() and clip_is_complete(out / CLIP_DIR):
        shutil.copytree(out / CLIP_DIR, staging / CLIP_DIR)

    times: dict[str, float] = {}
    t = time.perf_counter()
    data = load_package(max_images)
    built = _write_tasks(staging, data, seed, held_out_families)
    times["tasks"] = time.perf_counter() - t

    t = time.perf_counter()
    image_ids = list(data.image_paths)
    images = load_images(data.image_paths, clip_config.image_size, progress=progress)
    times["images"] = time.perf_counter() - t

    t = time.perf_counter()
    captions, sets = clip_training_data(data, image_ids, images)
    train_kw = {"epochs": clip_epochs, "batch_size": clip_batch_size, "lr": clip_lr, "seed": seed}
    clip, clip_reused = load_or_train_clip(
        staging, clip_config, captions, sets["train"], sets["test"], options=clip_options, force=force,
        log_dir=log_dir, progress=progress, num_threads=num_threads, devices=clip_devices,
        precision=clip_precision, **train_kw,
    )  # fmt: skip
    times["clip"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = clip.config
    with torch_threads(num_threads):
        enc = encode_dataset(
            staging, ENCODER, clip.model, clip.tokenizer, image_ids, images, built["tasks"], built["prompts"],
            cfg.image_mean, cfg.image_std, progress=progress,
        )  # fmt: skip
    times["features"] = time.perf_counter() - t

    clip_info = {
        **cfg.extra["metrics"],
        "images_with_caption": sets["images_with_caption"],
        "reused": clip_reused,
    }
    info = _manifest_info(built, enc, clip_info, options)
    write_manifest(staging, info)
    publish(staging, out)
    times["total"] = time.perf_counter() - start
    log.info("%s: dataset written in %.1f s", out, times["total"])
    return _summary(out, info, False, times)
