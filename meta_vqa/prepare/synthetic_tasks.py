"""Synthetic features for the real Meta-VQA task files: the benchmark's exact structure, no data needed.

The authors' task files fix which images each task uses and their labels; only the features are made up,
so tests, benchmarks and short pipeline runs see the real 870/373 tasks, support sets of up to 1,242
examples and up to 203 answers. The features carry learnable structure like the small synthetic set:

* every task has a latent *kind* (a stand-in for "colour of an object", "count of people", ...), and an
  answer of a task means a value ``v(kind, answer) = (e[answer] + h[kind, answer]) / √2``: a component
  shared by every task with that answer string plus one specific to the kind;
* an image's feature is the sum of the values it carries in every task it belongs to, plus noise, so its
  label is readable from it in each of its tasks;
* a question embedding is its kind's direction, a "flip" direction for the quarter of tasks whose answer
  prompts are rolled by one (like the negated questions of the small set: zero-shot reading of the prompts
  is wrong there, and only the question says so), and per-task noise that tells tasks apart (cosine
  ≈ 0.8 between two questions of one kind);
* an answer prompt is the value of its answer (for flipped tasks: of the next answer) plus noise, so
  reading the prompts zero-shot is informative but imperfect and the support set still helps.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from meta_vqa.data.features import write_features, write_manifest
from meta_vqa.data.tasks import Task, load_prompts, load_tasks
from meta_vqa.errors import ConfigError
from meta_vqa.prepare.layout import TASK_FILES, common_info, task_images, write_prompts, write_task_files
from meta_vqa.prepare.staging import fresh_staging, normalise, publish, reusable

log = logging.getLogger(__name__)

BUILDER = "meta-vqa-synthetic"
BUILDER_VERSION = 1
ENCODER = "synthetic"
GENERIC_TEMPLATE = "the answer is {}"
REFERENCE_DIM = 768  # CLIP ViT-L/14's width: the noise levels are stated for it


def synthesise_features(
    tasks: list[Task],
    image_ids: list[str],
    dim: int,
    seed: int,
    n_kinds: int = 48,
    flip_fraction: float = 0.25,
    noise: float = 6.0,
    prompt_noise: float = 2.5,
) -> dict:
    """Image, question and answer-prompt features of ``tasks`` (see the module docstring).

    A value has norm ≈ 1; ``noise`` and ``prompt_noise`` are the norms of the noise added to an image and
    to an answer prompt at width 768, scaled by √(dim / 768) at other widths so that narrow test sets stay
    learnable too. At width 768 the defaults put meta-test accuracy at ≈ 16 % chance, ≈ 50 % reading the
    prompts zero-shot (65 % on unflipped tasks) and ≈ 66 % for a nearest-prototype classifier on the
    whole support set (seed 0): learnable, far from solved. At width 64: ≈ 70 % and ≈ 85 %.

    Returns ``images`` [N, dim], ``questions`` [Q, dim], ``answers`` (one [K, dim] per task), ``kind`` and
    ``flipped`` (per task, for tests).
    """
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(dim)  # unit-norm directions in expectation
    noise, prompt_noise = (n * math.sqrt(dim / REFERENCE_DIM) for n in (noise, prompt_noise))
    kind = torch.randint(0, n_kinds, (len(tasks),), generator=g)
    flipped = torch.rand(len(tasks), generator=g) < flip_fraction
    kinds, flips = kind.tolist(), flipped.tolist()
    vocab = {a: i for i, a in enumerate(dict.fromkeys(a for t in tasks for a in t.answers))}
    shared = torch.randn(len(vocab), dim, generator=g) * scale
    pair_row: dict[tuple[int, str], int] = {}
    for ti, t in enumerate(tasks):
        for a in t.answers:
            pair_row.setdefault((kinds[ti], a), len(pair_row))
    pair_answer = torch.tensor([vocab[a] for _, a in pair_row], dtype=torch.long)
    values = (shared[pair_answer] + torch.randn(len(pair_row), dim, generator=g) * scale) / math.sqrt(2)

    row_of = {img: i for i, img in enumerate(image_ids)}
    images = torch.randn(len(image_ids), dim, generator=g).mul_(noise * scale)
    rows, vals = [], []
    for ti, t in enumerate(tasks):
        value_rows = [pair_row[(kinds[ti], a)] for a in t.answers]
        for img, y in t.support + t.query:
            rows.append(row_of[img])
            vals.append(value_rows[y])
    rows_t, vals_t = torch.tensor(rows), torch.tensor(vals)
    for s in range(0, len(rows), 16384):  # bounded temporaries
        images.index_add_(0, rows_t[s : s + 16384], values[vals_t[s : s + 16384]])

    kind_dir = torch.randn(n_kinds, dim, generator=g) * scale
    flip_dir = torch.randn(dim, generator=g) * scale
    questions = kind_dir[kind] + flipped[:, None].float() * flip_dir
    questions += 0.5 * scale * torch.randn(len(tasks), dim, generator=g)
    prompt_rows = []
    for ti, t in enumerate(tasks):
        value_rows = [pair_row[(kinds[ti], a)] for a in t.answers]
        prompt_rows += value_rows[-1:] + value_rows[:-1] if flips[ti] else value_rows  # rolled by one
    # one gather and one draw for all prompts: thousands of small tensors made this step slow
    prompts = values[torch.tensor(prompt_rows)]
    prompts += prompt_noise * scale * torch.randn(len(prompt_rows), dim, generator=g)
    answers = list(torch.split(prompts, [t.num_answers for t in tasks]))
    return {"images": images, "questions": questions, "answers": answers, "kind": kind, "flipped": flipped}


def make_synthetic_meta_vqa(
    tasks_dir: str | Path,
    out: str | Path = "data/meta_vqa_synthetic",
    dim: int = 768,
    seed: int = 0,
    prompts: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Build (or reuse) a dataset folder with the real task files of ``tasks_dir`` and synthetic features.

    ``prompts``: ``{question: template}`` file (default: ``prompt_meta.json`` beside the tasks if there,
    else a generic template). Returns a summary with the counts and statistics.
    """
    start = time.perf_counter()
    if dim < 2:
        raise ConfigError(f"--dim must be at least 2, got {dim}")
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"--tasks {tasks_dir}: no such folder")
    if prompts is None and (tasks_dir / "prompt_meta.json").is_file():
        prompts = tasks_dir / "prompt_meta.json"
    options = {
        "tasks": str(tasks_dir.resolve()),
        "dim": dim,
        "seed": seed,
        "prompts": None if prompts is None else str(Path(prompts).resolve()),
    }
    out = Path(out)
    kept = reusable(out, BUILDER, BUILDER_VERSION, options, force)
    if kept is not None:
        log.info("%s: synthetic dataset complete and valid, reusing it", out)
        return {"out": str(out), "reused": True, "counts": kept["counts"]}

    sources = [tasks_dir / name for name in TASK_FILES]
    train, test = (load_tasks(p) for p in sources)
    tasks = train + test
    templates = (
        load_prompts(prompts, [t.question for t in tasks])
        if prompts is not None
        else {t.question: GENERIC_TEMPLATE for t in tasks}
    )
    image_ids = task_images(tasks)
    feats = synthesise_features(tasks, image_ids, dim, seed)

    staging = fresh_staging(out)
    write_features(
        staging, ENCODER, image_ids, feats["images"], [t.question for t in tasks], feats["questions"],
        [list(t.answers) for t in tasks], feats["answers"],
    )  # fmt: skip
    write_task_files(staging, train, test, sources)
    write_prompts(staging, templates, tasks)
    sizes = {
        "dim": dim,
        "question_dim": dim,
        "images": len(image_ids),
        "questions": len(tasks),
        "answer_prompts": sum(t.num_answers for t in tasks),
    }
    info = common_info(BUILDER, BUILDER_VERSION, ENCODER, sizes, train, test, normalise(options))
    info |= {"seed": seed, "flipped_tasks": int(feats["flipped"].sum())}
    write_manifest(staging, info)
    publish(staging, out)
    elapsed = time.perf_counter() - start
    log.info("%s: synthetic Meta-VQA features written in %.1f s", out, elapsed)
    return {"out": str(out), "reused": False, "counts": info["counts"], "wall_time_s": elapsed}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-vqa prepare synthetic",
        description="Synthetic, learnable features for real Meta-VQA task files (no images or CLIP needed).",
    )
    p.add_argument("--tasks", required=True, help="folder with meta_train.json and meta_test.json")
    p.add_argument("--dim", type=int, default=768, help="feature width (768: CLIP ViT-L/14's)")
    p.add_argument("--out", default="data/meta_vqa_synthetic", help="dataset folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="{question: template} json (default: beside the tasks)")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid dataset is there")
    p.add_argument(
        "--json", action="store_true", help="print the whole summary (task statistics included) as JSON"
    )
    return p


def main(argv: list[str]) -> int:
    """``meta-vqa prepare synthetic --tasks DIR [--dim D] [--out DIR] [--seed S]``."""
    args = build_parser().parse_args(argv)
    summary = make_synthetic_meta_vqa(args.tasks, args.out, args.dim, args.seed, args.prompts, args.force)
    from meta_vqa.prepare import print_summary

    print_summary(summary, args.json)
    return 0
