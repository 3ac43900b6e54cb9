#!/usr/bin/env python
"""Kill a training stage with SIGKILL at a random step, resume it from ``last.ckpt``, and compare with a run
never killed: the final weights (largest |difference|) and ``results.json`` (equal or not).

    python scripts/resume_check.py --out runs/resume_check --data data/synthetic [--seed 0] [--stages hnet ...]

Each stage is a smoke config (``conf/smoke``) run by ``meta-vqa fit`` in its own process with
``--last_checkpoint.every_n_train_steps 1 --test_after_fit true``. The killed run is watched: once its
``last.ckpt`` holds the step drawn for it (uniform in 1 … max_steps-2), the process gets SIGKILL wherever it
is (a later step, a validation, a checkpoint write). The resumed run is the same command with ``--ckpt_path
OUT/<stage>/killed/last.ckpt``, as ``meta-vqa pipeline`` resumes. Upstream of the guidance stages: an
HNet-MAML and its adaptation dataset made once (``OUT/upstream``). One JSON line per stage; exit status 1 when
a weight differs by more than 1e-6 or the results are not equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(argv: list[str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "meta_vqa", *argv], stdout=f, stderr=subprocess.STDOUT, env=env()
        )
    if rc.returncode:
        raise SystemExit(f"resume_check: exit {rc.returncode}: {argv}\n{log.read_text()[-3000:]}")


def step_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not there yet, or being replaced
        return None


def run_and_kill(argv: list[str], last: Path, at: int, log: Path) -> tuple[int | None, float]:
    """Start the command, SIGKILL it once ``last`` holds step ``at`` or later; (step on disk after, seconds)."""
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, "-m", "meta_vqa", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env())  # fmt: skip
        mtime = None
        while proc.poll() is None:
            m = last.stat().st_mtime_ns if last.is_file() else None
            if m is not None and m != mtime:
                mtime = m
                s = step_of(last)
                if s is not None and s >= at:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"resume_check: the run ended (exit {proc.returncode}) before step {at}: {log}")
    return step_of(last), time.time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--seed", type=int, default=0, help="draws the kill steps")
    p.add_argument("--stages", nargs="*", default=["base", "hnet", "hvae", "hyperclip", "hyperldm"])
    a = p.parse_args()
    out, data = Path(a.out), str(a.data)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(data) / "dataset.json").is_file():
        run(["prepare", "synthetic", "--out", data], out / "prepare.log")
    quiet = ["--data.root", data, "--seed_everything", "0", "--trainer.enable_progress_bar", "false",
             "--trainer.logger", "false"]  # fmt: skip
    up = out / "upstream"
    hnet = up / "hnet" / "best.ckpt"
    if not hnet.is_file():
        run(
            ["fit", "-c", str(SMOKE / "hnet.yaml"), *quiet, "--stage_dir", str(up / "hnet")],
            out / "upstream_hnet.log",
        )
    if not (up / "adaptation" / "adaptation.json").is_file():
        run(["predict", "-c", str(SMOKE / "adapt.yaml"), "--data.root", data, "--stage_dir", str(up / "adaptation"),
             "--ckpt_path", str(hnet)], out / "upstream_adaptation.log")  # fmt: skip
    upstream = ["--data.adaptation", str(up / "adaptation"), "--model.init_args.upstream_ckpt", str(hnet)]
    stages = {  # (arguments, max_steps): shorter than the smoke configs where those are long
        "base": (["--model.init_args.variant", "mnet_maml"], 30),
        "hnet": ([], 40),
        "hvae": (upstream, 60),
        "hyperclip": (upstream, 60),
        "hyperldm": ([*upstream, "--trainer.check_val_every_n_epoch", "10"], 120),
    }
    rng = random.Random(a.seed)
    bad = False
    for name in a.stages:
        extra, steps = stages[name]
        argv = ["fit", "-c", str(SMOKE / f"{name}.yaml"), *quiet, *extra, "--trainer.max_steps", str(steps),
                "--last_checkpoint.every_n_train_steps", "1", "--test_after_fit", "true"]  # fmt: skip
        ref, killed = out / name / "uninterrupted", out / name / "killed"
        for d in (ref, killed):
            if d.exists():
                import shutil

                shutil.rmtree(d)
        t0 = time.time()
        run([*argv, "--stage_dir", str(ref)], out / f"{name}_uninterrupted.log")
        wall = time.time() - t0
        at = rng.randint(1, steps - 2)
        on_disk, _ = run_and_kill([*argv, "--stage_dir", str(killed)], killed / "last.ckpt", at,
                                  out / f"{name}_killed.log")  # fmt: skip
        leftovers = sorted(p.name for p in killed.iterdir())
        run(
            [*argv, "--stage_dir", str(killed), "--ckpt_path", str(killed / "last.ckpt")],
            out / f"{name}_resumed.log",
        )
        a_ = torch.load(ref / "last.ckpt", map_location="cpu", weights_only=True)
        b_ = torch.load(killed / "last.ckpt", map_location="cpu", weights_only=True)
        diff = max((a_["state_dict"][k].float() - b_["state_dict"][k].float()).abs().max().item()
                   for k in a_["state_dict"] if a_["state_dict"][k].numel())  # fmt: skip
        same = json.loads((ref / "results.json").read_text()) == json.loads(
            (killed / "results.json").read_text()
        )
        row = {"figure": "killed_and_resumed", "stage": name, "max_steps": steps, "kill_drawn_at_step": at,
               "last_ckpt_step_after_kill": on_disk, "left_after_kill": leftovers,
               "final_step": [a_["global_step"], b_["global_step"]], "max_abs_dweight": diff,
               "results_equal": same, "wall_s_uninterrupted": round(wall, 1)}  # fmt: skip
        bad |= diff > 1e-6 or not same
        print(json.dumps(row), flush=True)
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
