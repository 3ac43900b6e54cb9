"""``meta-vqa prepare``: the dataset builders (the only layer that trains a model to build data: the
small CLIP of Meta-EasyVQA).

* ``easy-vqa``: Meta-EasyVQA from the offline ``easy-vqa`` package (:mod:`meta_vqa.prepare.easy_vqa`);
* ``meta-vqa``: the paper's Meta-VQA, from the authors' task files or the recipe on VQA v2, with the
  authors' CLIP features imported or COCO encoded with open_clip (:mod:`meta_vqa.prepare.meta_vqa`);
* ``synthetic``: the tiny learnable dataset of the tests and ``conf/smoke``
  (:mod:`meta_vqa.prepare.synthetic`);
  with ``--tasks DIR``, learnable features for real task files such as Meta-VQA's
  (:mod:`meta_vqa.prepare.synthetic_tasks`).

Each builder writes a dataset folder (task files, prompts, the feature store, ``dataset.json``) that the
DataModule of every stage reads.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from meta_vqa.errors import MetaVQAError

log = logging.getLogger(__name__)

DATASETS = ("easy-vqa", "synthetic", "meta-vqa")
DEFAULT_OUT = {"easy-vqa": "data/easy_vqa", "synthetic": "data/synthetic", "meta-vqa": "data/meta_vqa"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-vqa prepare",
        description="Build a dataset folder. `meta-vqa prepare meta-vqa --help` and "
        "`meta-vqa prepare synthetic --tasks DIR --help` list the options of those builders.",
    )
    p.add_argument("dataset", choices=DATASETS, help="which dataset to build")
    p.add_argument("--out", default=None, help="output folder (default: data/easy_vqa, data/synthetic)")
    p.add_argument("--seed", type=int, default=2021, help="seed of the support/query and task splits")
    p.add_argument("--clip-epochs", type=int, default=None, help="epochs of the small CLIP's image tower")
    p.add_argument(
        "--clip-devices",
        type=int,
        default=1,
        help="easy-vqa: train the CLIP with DDP on this many devices (the batch is split over them)",
    )
    p.add_argument(
        "--clip-precision",
        default="32-true",
        choices=("32-true", "bf16-mixed", "16-mixed"),
        help="easy-vqa: the CLIP's training precision (16-mixed needs a CUDA GPU)",
    )
    p.add_argument(
        "--tasks-per-attribute",
        type=int,
        default=None,
        help="synthetic: tasks per attribute (default 4: 16 tasks, 5 of them meta-test; more tasks make "
        "comparisons between runs finer than one task's share of the mean)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a valid dataset is there")
    p.add_argument(
        "--log-dir",
        default="lightning_logs",
        help="easy-vqa: TensorBoard folder of the CLIP's training run (<log-dir>/clip; default lightning_logs)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the whole summary (task statistics included) as JSON"
    )
    return p


def print_summary(summary: dict, as_json: bool) -> None:
    """A builder's summary: the whole of it as JSON (``--json``), else a few lines."""
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return
    times = summary.get("wall_time_s") or {}
    total = times.get("total") if isinstance(times, dict) else None
    how = "checked and reused" if summary.get("reused") else "built"
    lines = [f"{summary.get('out')}: {how}" + (f" in {total:.0f} s" if total is not None else "")]
    counts = summary.get("counts") or {}
    if counts:
        lines.append("   " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if summary.get("encoder"):
        lines.append(
            f"   features {summary['encoder']} (dim {summary.get('dim')}, questions {summary.get('question_dim')})"
        )
    clip = summary.get("clip") or {}
    if "retrieval_accuracy" in clip:
        lines.append(
            f"   CLIP: held-out image→caption retrieval {100 * clip['retrieval_accuracy']:.1f} % "
            f"(train {100 * clip.get('train_accuracy', float('nan')):.1f} %, {clip.get('captions')} captions)"
        )
    lines.append("   (--json prints the whole summary, with the task statistics)")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    """Run ``meta-vqa prepare`` with the arguments ``argv``; errors are :class:`MetaVQAError`."""
    if argv[:1] == ["meta-vqa"]:
        from meta_vqa.prepare.meta_vqa import main as meta_vqa_main

        return meta_vqa_main(argv[1:])
    if argv[:1] == ["synthetic"] and any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        from meta_vqa.prepare.synthetic_tasks import main as synthetic_tasks_main

        return synthetic_tasks_main(argv[1:])
    args = build_parser().parse_args(argv)
    out = args.out or DEFAULT_OUT[args.dataset]
    if args.dataset == "synthetic":
        return prepare_synthetic(out, args.seed, args.force, args.tasks_per_attribute)
    if args.tasks_per_attribute is not None:
        raise MetaVQAError("--tasks-per-attribute is an option of `prepare synthetic` only")
    from meta_vqa.prepare.easy_vqa import prepare_easy_vqa

    kwargs: dict[str, Any] = {"seed": args.seed, "force": args.force}
    kwargs |= {"clip_devices": args.clip_devices, "clip_precision": args.clip_precision}
    kwargs["log_dir"] = args.log_dir
    if args.clip_epochs is not None:
        kwargs["clip_epochs"] = args.clip_epochs
    summary = prepare_easy_vqa(out, **kwargs)
    print_summary(summary, args.json)
    return 0


def prepare_synthetic(out: str | Path, seed: int, force: bool, tasks_per_attribute: int | None = None) -> int:
    """The small synthetic dataset of the tests and conf/smoke: built in a staging folder and swapped in
    whole; an existing one is kept only after every file's sha256 was checked (and only if it was built
    with the same options)."""
    from meta_vqa.prepare import synthetic
    from meta_vqa.prepare.staging import fresh_staging, publish, reusable

    root = Path(out)
    seed = 0 if seed == 2021 else seed
    given = {"seed": seed}
    if tasks_per_attribute is not None:
        if tasks_per_attribute < 2:
            raise MetaVQAError(f"--tasks-per-attribute must be at least 2, got {tasks_per_attribute}")
        given["tasks_per_attribute"] = tasks_per_attribute
    options = synthetic.options(**given)
    if reusable(root, synthetic.BUILDER, synthetic.BUILDER_VERSION, options, force) is not None:
        print(f"{root}: synthetic dataset already built, every file checked (--force rebuilds it)")
        return 0
    staging = fresh_staging(root)
    synthetic.make_synthetic(staging, **options)
    publish(staging, root)
    print(f"{root}: synthetic dataset built")
    return 0
