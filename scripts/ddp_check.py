#!/usr/bin/env python
"""Every stage that trains or predicts, run by ``meta-vqa`` once in one process and once with DDP (Lightning
launches the ranks), compared: the final weights, the test results, the adaptation dataset.

    python scripts/ddp_check.py --out runs/ddp_check --data data/synthetic \\
        [--steps 4] [--ddp "--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu"]

The smoke configs (``conf/smoke``) with ``--trainer.max_steps STEPS`` and ``--test_after_fit true``; the
global batch is the config's (each of N ranks takes about B/N of it). Upstream of the guidance stages: an
HNet-MAML trained for the smoke config's steps and its adaptation dataset, both by one process
(``OUT/upstream``), so that every comparison is of one stage only. Prints one JSON line per stage: the
largest |difference| of a weight between the two runs (``max_abs_dweight``) next to how far the steps moved
them (``moved``: the one-process run's largest |final - initial|), the largest |difference| of a test accuracy (points), and the wall time of each run.
Exit status 1 when a weight differs by more than ``--atol`` or a result by more than 1e-6 points.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke"
VARIANTS = ("clip_zero_shot", "uncond_multitask", "cond_multitask", "cond_multitask_film", "mnet_maml")


# `meta-vqa ARGV` that first saves the fitted model's weights before its first step (STAGE_DIR/initial.pt)
SAVING_INITIAL = """
import sys
from pathlib import Path
import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf
from meta_vqa.cli import main
fit = pl.Trainer.fit
def saving_fit(self, model=None, *args, **kwargs):
    Path(self.default_root_dir).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(self.default_root_dir) / "initial.pt")
    return fit(self, model, *args, **kwargs)
pl.Trainer.fit = saving_fit
sys.exit(main(sys.argv[1:]))
"""


def cli(argv: list[str], log: Path, save_initial: bool = False) -> float:
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = ["-c", SAVING_INITIAL] if save_initial else ["-m", "meta_vqa"]
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, *run, *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"ddp_check: exit {rc.returncode}: meta-vqa {shlex.join(argv)}\n{tail}")
    return time.time() - t0


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    return {k: v.float() for k, v in state.items() if torch.is_floating_point(v)}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(((a[k] - b[k]).abs().max().item() for k in a if a[k].numel()), default=0.0)


def results_diff(a: Path, b: Path) -> tuple[int, float, dict]:
    """(rows, largest |accuracy difference| of any row, {zero-shot row: [accuracy a, accuracy b]})."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    acc = ("accuracy", "accuracy_pooled")
    key = lambda r: json.dumps({k: v for k, v in r.items() if k not in acc}, sort_keys=True)
    da, db = {key(r): r["accuracy"] for r in ra}, {key(r): r["accuracy"] for r in rb}
    if da.keys() != db.keys():
        return len(ra), float("inf"), {}
    name = lambda r: " ".join(
        str(r[k]) for k in ("method", "gamma", "classifier_scale", "control") if r.get(k)
    )
    zero = {name(r): [round(da[key(r)], 2), round(db[key(r)], 2)] for r in ra if r["shots"] == 0}
    return len(ra), max((abs(da[k] - db[k]) for k in da), default=0.0), zero


def validation_by_steps() -> dict[str, list[str]]:
    """Per stage kind that trains: validate every half of its ``trainer.max_steps``."""
    out = {}
    for kind in ("base", "hnet", "hvae", "hyperclip", "hyperldm"):
        steps = int(OmegaConf.load(SMOKE / f"{kind}.yaml").trainer.max_steps)
        out[kind] = [
            "--trainer.check_val_every_n_epoch",
            "null",
            "--trainer.val_check_interval",
            str(steps // 2),
        ]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="data/synthetic", help="the synthetic dataset (built if missing)")
    p.add_argument(
        "--steps", type=int, default=4, help="optimiser steps of each compared fit (0: the config's)"
    )
    p.add_argument("--zero-shot", action="store_true", help="print the zero-shot accuracies of both runs")
    p.add_argument("--ddp", default="--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument(
        "--sgd",
        type=float,
        default=None,
        metavar="LR",
        help="train with plain SGD at this rate instead of the configs' Adam (whose first steps are "
        "about lr·sign(gradient): blind to a gradient's scale)",
    )
    p.add_argument(
        "--validate-by-steps",
        action="store_true",
        help="every fit (the upstream HNet too) validates at the middle and the end of its training, whatever the "
        "dataset's size (the smoke YAMLs validate every n epochs, n set for the default 16 tasks)",
    )
    p.add_argument("--stages", nargs="*", default=None, help="a subset (base/<variant>, hnet, adapt, ...)")
    a = p.parse_args()
    out, data = Path(a.out), str(a.data)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(data) / "dataset.json").is_file():
        cli(["prepare", "synthetic", "--out", data], out / "prepare.log")
    quiet = ["--data.root", data, "--seed_everything", "0", "--trainer.enable_progress_bar", "false"]
    by_steps = validation_by_steps() if a.validate_by_steps else {}
    up = out / "upstream"
    hnet = up / "hnet" / "best.ckpt"
    if not hnet.is_file():
        cli(["fit", "-c", str(SMOKE / "hnet.yaml"), *quiet, "--trainer.logger", "false", "--stage_dir",
             str(up / "hnet"), *by_steps.get("hnet", [])], out / "upstream_hnet.log")  # fmt: skip
    if not (up / "adaptation" / "adaptation.json").is_file():
        cli(["predict", "-c", str(SMOKE / "adapt.yaml"), "--data.root", data, "--stage_dir",
             str(up / "adaptation"), "--ckpt_path", str(hnet)], out / "upstream_adaptation.log")  # fmt: skip
    upstream = ["--data.adaptation", str(up / "adaptation"), "--model.init_args.upstream_ckpt", str(hnet)]
    sgd = [] if a.sgd is None else ["--model.init_args.optimizer", "torch.optim.SGD",
                                    "--model.init_args.optimizer.init_args.lr", str(a.sgd)]  # fmt: skip
    fit = lambda cfg: ["fit", "-c", str(SMOKE / cfg), *quiet, "--trainer.logger", "false",
                       *by_steps.get(cfg.removesuffix(".yaml"), []),
                       *(["--trainer.max_steps", str(a.steps)] if a.steps else []), "--test_after_fit", "true",
                       *sgd]  # fmt: skip
    stages: dict[str, list[str]] = {}
    for v in VARIANTS:
        variant = ["--model.init_args.variant", v]
        if v == "clip_zero_shot":
            stages[f"base/{v}"] = ["test", "-c", str(SMOKE / "base.yaml"), *quiet, *variant]
        else:
            stages[f"base/{v}"] = [*fit("base.yaml"), *variant]
    stages["hnet"] = fit("hnet.yaml")
    stages["adapt"] = [
        "predict",
        "-c",
        str(SMOKE / "adapt.yaml"),
        "--data.root",
        data,
        "--ckpt_path",
        str(hnet),
    ]
    for kind in ("hvae", "hyperclip", "hyperldm"):
        stages[kind] = [*fit(f"{kind}.yaml"), *upstream]
    worst = 0.0
    for name, argv in stages.items():
        if a.stages and name not in a.stages:
            continue
        row: dict = {"figure": "ddp_vs_one_process", "stage": name, "ddp": a.ddp, "steps": a.steps,
                     "optimizer": "Adam (config)" if a.sgd is None else f"SGD lr={a.sgd}"}  # fmt: skip
        dirs = {}
        for mode, extra in (("one", []), ("ddp", shlex.split(a.ddp))):
            d = out / mode / name
            dirs[mode] = d
            if d.exists():
                import shutil

                shutil.rmtree(d)
            if argv[0] == "predict":
                d.parent.mkdir(parents=True, exist_ok=True)  # the adaptation folder is the stage folder
            log = out / f"{mode}_{name.replace('/', '_')}.log"
            row[f"wall_s_{mode}"] = round(cli([*argv, "--stage_dir", str(d), *extra], log, mode == "one"), 1)
        one, two = dirs["one"], dirs["ddp"]
        bad = False
        if (one / "last.ckpt").is_file():
            wa, wb = weights(one / "last.ckpt"), weights(two / "last.ckpt")
            row["max_abs_dweight"] = max_diff(wa, wb)
            row["max_abs_weight"] = max(v.abs().max().item() for v in wa.values() if v.numel())
            if (one / "initial.pt").is_file():  # how far the steps moved the weights: the scale of the check
                w0 = weights(one / "initial.pt")
                row["moved"] = max_diff({k: wa[k] for k in w0}, w0)
            bad |= row["max_abs_dweight"] > a.atol
        if (one / "results.json").is_file():
            row["result_rows"], row["max_abs_daccuracy"], zero = results_diff(
                one / "results.json", two / "results.json"
            )
            if a.zero_shot:
                row["zero_shot_one_vs_variant"] = zero
                row["max_abs_dzero_shot"] = max((abs(x - y) for x, y in zero.values()), default=0.0)
            bad |= row["max_abs_daccuracy"] > 1e-6
        if (one / "adaptation.safetensors").is_file():
            from safetensors.torch import load_file

            ta, tb = (
                load_file(str(one / "adaptation.safetensors")),
                load_file(str(two / "adaptation.safetensors")),
            )
            row["max_abs_dadaptation"] = max_diff({k: v.float() for k, v in ta.items()},
                                                  {k: v.float() for k, v in tb.items()})  # fmt: skip
            meta = json.loads((two / "adaptation.json").read_text())
            row["adaptation_files"] = sorted(p.name for p in two.iterdir())
            row["parts_left"] = (two / "parts").exists()
            row["latents_shape"] = meta["shapes"]["latents"]  # [epochs, train tasks, latent dim]
            ids = {k: tb[k].tolist() for k in tb if k.endswith("task_ids")}
            row["task_ids_unique"] = all(len(set(v)) == len(v) for v in ids.values())  # each job's tasks once
            row["task_ids_equal_one_process"] = all(ta[k].tolist() == v for k, v in ids.items())
            bad |= row["max_abs_dadaptation"] > a.atol or row["parts_left"] or not row["task_ids_unique"]
            bad |= not row["task_ids_equal_one_process"]
        row["ok"] = not bad
        worst = max(worst, float(bad))
        print(json.dumps(row), flush=True)
    return int(worst)


if __name__ == "__main__":
    sys.exit(main())
