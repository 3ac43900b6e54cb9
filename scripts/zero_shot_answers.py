#!/usr/bin/env python
"""What the zero-shot weights of a meta-learned checkpoint answer: one answer for every query, or not.

A method that never reads the task's description (MNet-MAML, HNet-MAML, the HVAE) starts every task from
the same weights, so at zero shots it can only score the images against the task's answers. On
Meta-EasyVQA's test tasks those weights mostly answer every query of a task alike, and the accuracy of such a
constant guess depends on which answer it happens to be (on a yes/no task whose answers are 88 : 12, 0.88
or 0.12). This prints, per checkpoint, the zero-shot accuracy (the stage's ``acc_0``), how many test tasks
get one answer for all their queries, the mean share of a task's queries that get its most frequent
answer, and the answer given most often over all the test queries; with two checkpoints, ``--diff`` lists
the tasks whose accuracy differs by more than 0.2 and the answer each checkpoint gave there.

    python scripts/zero_shot_answers.py runs/easy_vqa/random/seed0/hnet/best.ckpt \\
        runs/easy_vqa/random/seed1/hnet/best.ckpt [--diff] [--data-root data/easy_vqa] [--split random]

The dataset is the one the checkpoint was trained on (its datamodule's root and split) unless given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class TaskAnswers:
    accuracy: float  # share of the task's queries answered correctly
    modal_answer: str  # the answer given most often
    modal_share: float  # the share of the queries given it
    labels: dict[str, int]  # how many queries have each answer
    given: dict[str, int]  # how many queries were given each answer


def load(ckpt: str):
    """The stage of ``ckpt`` (MNet-MAML, HNet-MAML or HVAE) and its datamodule's hyperparameters."""
    from meta_vqa.stages.base import BaseStage
    from meta_vqa.stages.checkpoints import check_stage, read_checkpoint, stage_of
    from meta_vqa.stages.handoff import class_path
    from meta_vqa.stages.hnet import HNetStage
    from meta_vqa.stages.hvae import HVAEStage

    classes = {class_path(c): c for c in (BaseStage, HNetStage, HVAEStage)}
    path, state = read_checkpoint(ckpt, "checkpoint")
    check_stage(path, state, list(classes), "checkpoint")
    cls = classes.get(stage_of(state) or "", HNetStage)
    model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    return model, state.get("datamodule_hyper_parameters", {})


def zero_shot_weights(model, batch) -> torch.Tensor:
    if hasattr(model, "start_latents"):  # HNet-MAML, HVAE: the weights of the start latent
        return model.weights(model.start_latents(batch))
    return model.to_weights(model.init_params(batch))  # MNet-MAML: the meta-learned weights


def answers_of(model, dm, names: list[str]) -> dict[int, TaskAnswers]:
    """Per test task: its zero-shot accuracy and the answers given."""
    out = {}
    with torch.no_grad():
        for index_batch in dm.test_dataloader():
            b = dm.to_batch(index_batch)
            w = zero_shot_weights(model, b)
            pred = model.adapter(w, b.query_x, b.answers, b.answer_mask).argmax(-1)
            for i in range(len(b)):
                m = b.query_mask[i]
                p, y = pred[i][m], b.query_y[i][m]
                answer_ids = index_batch.answer_idx[i]
                name = {k: names[int(a)] for k, a in enumerate(answer_ids.tolist()) if a >= 0}
                given = Counter(p.tolist())
                modal, count = given.most_common(1)[0]
                out[int(b.task[i])] = TaskAnswers(
                    (p == y).float().mean().item(),
                    name[modal],
                    count / len(p),
                    {name[k]: v for k, v in sorted(Counter(y.tolist()).items())},
                    {name[k]: v for k, v in sorted(given.items())},
                )
    return out


def summary(tasks: dict[int, TaskAnswers]) -> dict:
    n = len(tasks)
    given: Counter[str] = Counter()
    for t in tasks.values():
        given.update(t.given)
    top, top_count = given.most_common(1)[0]
    return {
        "zero_shot_accuracy": 100 * sum(t.accuracy for t in tasks.values()) / n,
        "tasks": n,
        "tasks_one_answer_for_all": sum(t.modal_share == 1.0 for t in tasks.values()),
        "mean_modal_share": sum(t.modal_share for t in tasks.values()) / n,
        "most_given_answer": top,  # over all the test queries
        "most_given_answer_share": top_count / sum(given.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="stage checkpoints (mnet_maml, hnet, hvae)")
    p.add_argument("--data-root", help="the dataset folder (default: the checkpoint's)")
    p.add_argument("--split", help="random or family (default: the checkpoint's)")
    p.add_argument("--diff", action="store_true", help="with two checkpoints: the tasks where they differ")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    args = p.parse_args(argv)
    if args.diff and len(args.checkpoints) != 2:
        p.error("--diff compares two checkpoints")

    from meta_vqa.errors import MetaVQAError

    try:
        return run(args)
    except MetaVQAError as e:  # a missing or foreign checkpoint, a dataset that is not there
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from meta_vqa.data.datamodule import MetaVQADataModule

    modules: dict[tuple[str, str], MetaVQADataModule] = {}
    per_ckpt = []
    for ckpt in args.checkpoints:
        model, data = load(ckpt)
        root = args.data_root or data.get("root", "data/easy_vqa")
        split = args.split or data.get("split", "random")
        if (root, split) not in modules:
            dm = MetaVQADataModule(root=root, split=split)
            dm.setup("test")
            modules[(root, split)] = dm
        dm = modules[(root, split)]
        names = [a for answers in dm.store.answers for a in answers]  # the answer matrix's rows
        tasks = answers_of(model, dm, names)
        per_ckpt.append(tasks)
        s = {"checkpoint": ckpt, "data_root": root, "split": split, **summary(tasks)}
        if args.json:
            print(json.dumps(s))
        else:
            print(
                f"{ckpt}: zero-shot {s['zero_shot_accuracy']:.1f} %; one answer for every query on "
                f"{s['tasks_one_answer_for_all']} of {s['tasks']} test tasks; mean share of the most "
                f"frequent answer {s['mean_modal_share']:.3f}; {s['most_given_answer']!r} given to "
                f"{s['most_given_answer_share']:.0%} of all queries"
            )
    if args.diff:
        a, b = per_ckpt
        for task in sorted(set(a) & set(b)):
            if abs(a[task].accuracy - b[task].accuracy) > 0.2:
                print(
                    f"  task {task}: accuracy {a[task].accuracy:.2f} vs {b[task].accuracy:.2f}, answered "
                    f"{a[task].modal_answer!r} ({a[task].modal_share:.0%}) vs {b[task].modal_answer!r} "
                    f"({b[task].modal_share:.0%}); labels {a[task].labels}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
