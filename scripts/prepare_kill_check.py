#!/usr/bin/env python
"""``prepare synthetic --force`` over an existing dataset, SIGKILLed at random moments: after each kill the
folder must hold the old dataset or the new one, whole (every file's sha256 as its manifest says), and the
next ``prepare`` must finish and leave no ``.partial``/``.old``/``.tmp`` behind.

    python scripts/prepare_kill_check.py --out runs/prepare_kill [--trials 12] [--seed 0]

A kill comes at a delay drawn uniformly in the write phase: from the moment the build folder
(``.data.partial``) appears to the end of the process, as measured on one uninterrupted ``prepare --force``
(the Python start before it writes nothing). One JSON line per trial, then a summary; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(out: Path, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meta_vqa",
        "prepare",
        "synthetic",
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--force",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def state(out: Path) -> str:
    """'old' or 'new' (by the manifest's options seed) when whole, else what is wrong."""
    from meta_vqa.data.features import verify_manifest

    if not (out / "dataset.json").is_file():
        return "no dataset.json"
    problems = verify_manifest(out)
    if problems:
        return f"broken: {problems[0]}"
    manifest = json.loads((out / "dataset.json").read_text())
    return f"whole (seed {manifest.get('options', {}).get('seed')})"


def leftovers(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out.parent))
        for p in out.parent.rglob("*")
        if p.name.endswith((".tmp", ".partial", ".old")) or ".partial" in p.name or ".old" in p.name
    )


def wait_for(path: Path, proc: subprocess.Popen) -> float:
    """The time at which ``path`` appeared (polled every 2 ms), or the process ended."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.002)
    return time.time()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a work folder (its data/ is rebuilt)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-delay", type=float, default=None, help="draw the delays in [0, this] seconds instead"
    )
    a = p.parse_args()
    work = Path(a.out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = work / "data"
    subprocess.run(prepare(out, 1), check=True, env=env(), capture_output=True)
    staging = out.parent / f".{out.name}.partial"
    proc = subprocess.Popen(prepare(out, 2), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = wait_for(staging, proc)
    proc.wait()
    wall = time.time() - t0
    rng = random.Random(a.seed)
    bad = 0
    for trial in range(a.trials):
        new = 3 + trial
        delay = rng.uniform(0, wall if a.max_delay is None else a.max_delay)
        proc = subprocess.Popen(
            prepare(out, new), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(staging, proc)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill, left = state(out), leftovers(out)
        rerun = subprocess.run(prepare(out, new), env=env(), capture_output=True, text=True)
        final, left_final = state(out), leftovers(out)
        ok = after_kill.startswith("whole") and rerun.returncode == 0 and final == f"whole (seed {new})"
        ok = ok and not left_final
        bad += not ok
        row = {"trial": trial, "kill_after_s": round(delay, 2), "killed": killed, "after_kill": after_kill,
               "left_after_kill": left, "rerun_rc": rerun.returncode, "after_rerun": final,
               "left_after_rerun": left_final, "ok": ok}  # fmt: skip
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "figure": "prepare_killed",
                "trials": a.trials,
                "failures": bad,
                "write_phase_s": round(wall, 2),
            }
        )
    )
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
