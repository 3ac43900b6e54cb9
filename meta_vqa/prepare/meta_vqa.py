"""``meta-vqa prepare meta-vqa``: the paper's Meta-VQA benchmark as a dataset folder.

Tasks come from the authors' published task files (``--tasks``) or are rebuilt from raw VQA v2 with their
recipe (``--vqa-root``); features are imported from the authors' precomputed CLIP files (``--features``)
or encoded from the COCO images with open_clip (``--coco-root``). The folder is built beside ``--out`` and
swapped in when complete; a kept dataset is reused only if its manifest matches these options and every
file's sha256 still does. An interrupted encoding resumes from its last finished image shard.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from meta_vqa.data.features import write_features, write_manifest
from meta_vqa.data.tasks import Task, load_prompts, load_tasks
from meta_vqa.device import PRECISIONS, autocast, resolve_device
from meta_vqa.errors import ConfigError
from meta_vqa.io import sha256_file
from meta_vqa.prepare import authors_features, clip_encode
from meta_vqa.prepare.layout import TASK_FILES, common_info, task_images, write_prompts, write_task_files
from meta_vqa.prepare.staging import fresh_staging, normalise, publish, reusable
from meta_vqa.prepare.vqa_recipe import SEED, build_meta_vqa_tasks

log = logging.getLogger(__name__)

BUILDER = "meta-vqa"
BUILDER_VERSION = 1
PROMPT_FILE = "prompt_meta.json"  # the authors' name for {question: template}
SHARDS = "shards"


def _resolve(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _prompt_file(prompts: str | Path | None, tasks: str | Path | None, vqa_root: str | Path | None) -> Path:
    if prompts is not None:
        return Path(prompts)
    for folder in (tasks, vqa_root):
        if folder is not None and (Path(folder) / PROMPT_FILE).is_file():
            return Path(folder) / PROMPT_FILE
    raise ConfigError(f"--prompts: required (the authors' {PROMPT_FILE}); none found beside the tasks")


def encoder_name(clip: str, pretrained: str | None) -> str:
    """The feature-set name of an open_clip encoding, e.g. ``vit-l-14-336-openai``."""
    tag = "random" if pretrained in (None, "none") else "file" if Path(pretrained).is_file() else pretrained
    return f"{clip}-{tag}".lower().replace("/", "-")


def _load_tasks(tasks: str | Path | None, vqa_root: str | Path | None, seed: int) -> tuple[list, list, dict]:
    """(meta-train, meta-test, report): the authors' files as they are, or the recipe run on VQA v2."""
    if tasks is not None:
        paths = [Path(tasks) / name for name in TASK_FILES]
        train, test = (load_tasks(p) for p in paths)
        return train, test, {"source": "task files", "files": [str(p) for p in paths]}
    train, test, report = build_meta_vqa_tasks(vqa_root, seed)
    return train, test, {"source": "VQA v2", **report}


def prepare_meta_vqa(
    out: str | Path = "data/meta_vqa",
    *,
    tasks: str | Path | None = None,
    vqa_root: str | Path | None = None,
    features: str | Path | None = None,
    coco_root: str | Path | None = None,
    prompts: str | Path | None = None,
    clip: str = "ViT-L-14-336",
    pretrained: str | None = "openai",
    device: str = "auto",
    precision: clip_encode.Precision = "fp32",
    batch_size: int = 64,
    shard_size: int = 4096,
    workers: int | None = None,
    seed: int = SEED,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or reuse) the Meta-VQA dataset folder ``out``; returns a summary with its statistics.

    Args:
        out: the dataset folder.
        tasks: folder with the authors' meta_train.json / meta_test.json (used unchanged).
        vqa_root: folder with the VQA v2 questions/annotations json files (tasks built by the recipe).
        features: the authors' feature folder (ImageFeatures/, QuesFeatures/, TextFeatures/) to import.
        coco_root: COCO 2014 images (train2014/, val2014/) to encode with ``clip``.
        prompts: ``{question: template}`` file (default: prompt_meta.json beside the tasks).
        clip, pretrained, device, precision, batch_size, shard_size, workers: the encoding (``coco_root``).
        seed: seed of the recipe's two splits (``vqa_root``); the authors used 2021.
        force: rebuild even if a valid dataset with these options exists.
        progress: show progress bars.
    """
    start = time.perf_counter()
    if (tasks is None) == (vqa_root is None):
        raise ConfigError(
            "give the tasks by exactly one of --tasks DIR (the authors' files) or --vqa-root DIR"
        )
    if (features is None) == (coco_root is None):
        raise ConfigError(
            "give the features by exactly one of --features DIR (import) or --coco-root DIR (encode)"
        )
    for flag, folder in (
        ("--tasks", tasks),
        ("--vqa-root", vqa_root),
        ("--features", features),
        ("--coco-root", coco_root),
    ):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder}: no such folder")
    prompt_file = _prompt_file(prompts, tasks, vqa_root)
    mode = "import" if features is not None else "encode"
    options = {
        "tasks": _resolve(tasks),
        "vqa_root": _resolve(vqa_root),
        "prompts": _resolve(prompt_file),
        "seed": seed if vqa_root is not None else None,
        "features": _resolve(features),
    }
    if mode == "encode":
        weights = _resolve(pretrained) if pretrained and Path(pretrained).is_file() else pretrained
        options |= {
            "coco_root": _resolve(coco_root),
            "clip": clip,
            "pretrained": weights,
            "precision": precision,
        }
    out = Path(out)
    kept = reusable(out, BUILDER, BUILDER_VERSION, options, force)
    if kept is not None and _inputs_changed(kept, tasks, features):
        log.info("%s: its task or feature files changed since the build; rebuilding", out)
        kept = None
    if kept is not None:
        log.info("%s: dataset complete and valid, reusing it", out)
        return _summary(out, kept, True, {"total": time.perf_counter() - start})

    staging = fresh_staging(out, keep=(SHARDS,) if mode == "encode" else ())
    times: dict[str, float] = {}
    t = time.perf_counter()
    train, test, task_report = _load_tasks(tasks, vqa_root, seed)
    all_tasks = train + test
    templates = load_prompts(prompt_file, [q.question for q in all_tasks])
    times["tasks"] = time.perf_counter() - t

    t = time.perf_counter()
    if mode == "import":
        source = {q.question: name for name, ts in zip(TASK_FILES, (train, test)) for q in ts}
        encoder = authors_features.ENCODER
        feats = authors_features.import_authors_features(features, all_tasks, staging, encoder, source)
        feature_info = {"kind": "authors' precomputed features", "sources": feats["sources"]}
    else:
        encoder, feats, feature_info = _encode(
            staging, all_tasks, templates, coco_root, clip, pretrained, device, precision,
            batch_size, shard_size, workers, progress,
        )  # fmt: skip
    times["features"] = time.perf_counter() - t

    write_prompts(staging, templates, all_tasks)
    task_sources = write_task_files(
        staging, train, test, None if tasks is None else [Path(tasks) / n for n in TASK_FILES]
    )
    shutil.rmtree(staging / SHARDS, ignore_errors=True)
    info = common_info(BUILDER, BUILDER_VERSION, encoder, feats, train, test, normalise(options))
    info |= {
        "features": feature_info,
        "tasks": task_report | {"sha256": task_sources},
        "prompts": str(prompt_file),
    }
    manifest = write_manifest(staging, info)
    publish(staging, out)
    times["total"] = time.perf_counter() - start
    log.info("%s: dataset written in %.1f s", out, times["total"])
    return _summary(out, manifest, False, times)


def _inputs_changed(manifest: dict, tasks: str | Path | None, features: str | Path | None) -> bool:
    """Whether the given task files or the authors' feature files differ from those the dataset was built
    from (cheap: a few hundred MB hashed; raw VQA and COCO folders are not re-hashed, --force rebuilds)."""
    if tasks is not None:
        for name in TASK_FILES:
            if manifest.get("files", {}).get(name) != sha256_file(Path(tasks) / name):
                return True
    if features is not None:
        recorded = manifest.get("features", {}).get("sources", {})
        for kind, path in authors_features.authors_feature_files(features).items():
            if recorded.get(kind, {}).get("sha256") != sha256_file(path):
                return True
    return False


def _encode(
    staging: Path, tasks: list[Task], templates: dict, coco_root, clip: str, pretrained: str | None,
    device: str, precision: clip_encode.Precision, batch_size: int, shard_size: int, workers: int | None,
    progress: bool,
) -> tuple[str, dict, dict]:  # fmt: skip
    dev = resolve_device(device)
    autocast(dev, precision)  # reject a bad precision before the (slow) model build
    image_ids = task_images(tasks)
    paths = clip_encode.coco_image_paths(coco_root, tasks, image_ids)
    encoder = clip_encode.load_clip_encoder(clip, pretrained, dev)
    shards = staging / SHARDS
    images = clip_encode.encode_images_sharded(
        encoder, image_ids, paths, shards, shard_size, batch_size, dev, precision,
        clip_encode.default_workers() if workers is None else workers, progress,
    )  # fmt: skip
    questions, answers = clip_encode.encode_task_texts(
        encoder,
        tasks,
        templates,
        shards / "texts.safetensors",
        device=dev,
        precision=precision,
        progress=progress,
    )
    name = encoder_name(clip, pretrained)
    write_features(
        staging,
        name,
        image_ids,
        images,
        [t.question for t in tasks],
        questions,
        [list(t.answers) for t in tasks],
        answers,
    )
    feats = {
        "dim": int(images.shape[1]),
        "question_dim": int(questions.shape[1]),
        "images": len(image_ids),
        "questions": len(tasks),
        "answer_prompts": sum(t.num_answers for t in tasks),
    }
    info = {
        "kind": "open_clip encoding",
        "clip": encoder.info,
        "preprocessing": clip_encode.preprocessing_info(encoder),
        "precision": precision,
        "device": str(dev),
    }
    return name, feats, info


def _summary(out: Path, manifest: dict, reused: bool, times: dict) -> dict:
    keys = ("encoder", "dim", "question_dim", "counts", "statistics")
    summary = {"out": str(out), "reused": reused, **{k: manifest.get(k) for k in keys}, "wall_time_s": times}
    recipe = {
        k: v
        for k, v in manifest.get("tasks", {}).items()
        if k in ("questions", "tasks", "dropped", "instances")
    }
    return summary | ({"recipe": recipe} if recipe else {})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-vqa prepare meta-vqa",
        description="Build the paper's Meta-VQA dataset folder: tasks (the authors' files or the recipe on "
        "VQA v2) and CLIP features (the authors' files imported, or COCO images encoded with open_clip).",
    )
    src = p.add_argument_group("tasks (one of)")
    src.add_argument("--tasks", help="folder with the authors' meta_train.json and meta_test.json")
    src.add_argument(
        "--vqa-root", help="folder with the VQA v2 train2014/val2014 questions and annotations json"
    )
    feat = p.add_argument_group("features (one of)")
    feat.add_argument(
        "--features", help="the authors' feature folder (ImageFeatures/, QuesFeatures/, TextFeatures/)"
    )
    feat.add_argument("--coco-root", help="COCO 2014 images (train2014/, val2014/) to encode with --clip")
    p.add_argument("--prompts", help=f"{{question: template}} json (default: {PROMPT_FILE} beside the tasks)")
    enc = p.add_argument_group("encoding (with --coco-root)")
    enc.add_argument("--clip", default="ViT-L-14-336", help="open_clip model name (default: the paper's)")
    enc.add_argument(
        "--pretrained",
        default="openai",
        help="weight tag (needs open_clip's cache offline), a weight file, or none",
    )
    enc.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    enc.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast precision")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    enc.add_argument(
        "--workers", type=int, default=None, help="image-decoding processes (default: cores - 1, ≤ 8)"
    )
    p.add_argument("--out", default="data/meta_vqa", help="dataset folder (default: data/meta_vqa)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the recipe's splits (with --vqa-root)")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid dataset is there")
    p.add_argument(
        "--json", action="store_true", help="print the whole summary (task statistics included) as JSON"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    """``meta-vqa prepare meta-vqa [options]``; prints a short summary (``--json``: all of it)."""
    args = build_parser().parse_args(argv)
    summary = prepare_meta_vqa(
        args.out, tasks=args.tasks, vqa_root=args.vqa_root, features=args.features,
        coco_root=args.coco_root, prompts=args.prompts, clip=args.clip, pretrained=args.pretrained,
        device=args.device, precision=args.precision, batch_size=args.batch_size,
        shard_size=args.shard_size, workers=args.workers, seed=args.seed, force=args.force,
        progress=not args.no_progress,
    )  # fmt: skip
    from meta_vqa.prepare import print_summary

    print_summary(summary, args.json)
    return 0
