#!/usr/bin/env python
"""The smoke pipeline with extra trainer arguments on every stage (DDP, a precision), against a reference run.

    python scripts/smoke_variant.py --out runs/smoke_ddp --data data/synthetic --reference runs/smoke \\
        --args "--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu" \\
        [--prepare-args "--tasks-per-attribute 20" --validate-by-steps]

Writes ``OUT/pipeline.yaml`` (``conf/smoke/pipeline.yaml`` with ``--args`` added to every stage kind,
``launcher: process`` so that each stage is its own command, as DDP wants), runs it, and prints the
meta-test zero-shot accuracies of both runs (one JSON line per method, then a summary line with the wall
time and the largest difference). Exit status 1 when a difference exceeds ``--tolerance`` points.
``--run-reference`` first runs the plain smoke pipeline into ``--reference``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_check import validation_by_steps  # noqa: E402  (the sibling script)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke" / "pipeline.yaml"
KINDS = ("base", "hnet", "adapt", "hvae", "hyperclip", "hyperldm")


def run_pipeline(config: Path, out: Path, data: str, prepare_args: list[str]) -> float:
    t0 = time.time()
    cmd = [
        sys.executable,
        "-m",
        "meta_vqa",
        "pipeline",
        "-c",
        str(config),
        "--out",
        str(out),
        f"data.root={data}",
    ]
    if prepare_args:  # the same dataset options for both runs (a rebuild with others would replace it)
        cmd.append("data.prepare_args=[" + ",".join(prepare_args) + "]")
    subprocess.run([*cmd, "launcher=process"], check=True, stdout=sys.stderr)  # stdout: the JSON lines
    return time.time() - t0


def zero_shot(run: Path) -> dict[str, float]:
    """``method[ γ=..][ s=...][ (control)]`` → task-averaged zero-shot accuracy (%) of a run's results."""
    from meta_vqa.eval.results import _row_name, load_results

    rows = {}
    for r in load_results([run], exclude=run / "report"):
        if r["shots"] == 0:
            rows[_row_name(r["method"], r.get("gamma"), r.get("control"), r.get("classifier_scale"))] = r[
                "accuracy"
            ]
    return rows


def write_config(path: Path, common: dict[str, list[str]], extra: list[str]) -> Path:
    """``conf/smoke/pipeline.yaml`` with ``common[kind]`` and ``extra`` added to every stage kind's arguments,
    each stage its own command (``launcher: process``, as DDP wants)."""
    cfg = OmegaConf.load(SMOKE)
    cfg.configs = str(SMOKE.parent)
    args = OmegaConf.to_container(cfg.get("args") or {})
    cfg.args = {k: [*args.get(k, []), *common.get(k, []), *extra] for k in KINDS}
    cfg.launcher = "process"
    OmegaConf.save(cfg, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder of the variant")
    p.add_argument("--args", required=True, help="trainer arguments added to every stage (one string)")
    p.add_argument("--data", default="data/synthetic", help="the synthetic dataset (built if missing)")
    p.add_argument(
        "--prepare-args",
        default="",
        help="options of `meta-vqa prepare synthetic` (one string), e.g. '--tasks-per-attribute 20' for 80 tasks",
    )
    p.add_argument(
        "--validate-by-steps",
        action="store_true",
        help="both runs validate at the middle and the end of each stage's training, whatever the dataset's "
        "size (the smoke stage YAMLs validate every n epochs, n set for the default 16 tasks)",
    )
    p.add_argument("--reference", default=None, help="a run of the plain smoke pipeline to compare with")
    p.add_argument("--run-reference", action="store_true", help="run the reference first")
    p.add_argument("--tolerance", type=float, default=2.0, help="largest accepted difference (points)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    extra, prepare = shlex.split(a.args), shlex.split(a.prepare_args)
    common = validation_by_steps() if a.validate_by_steps else {}
    config = write_config(out / "pipeline.yaml", common, extra)
    if a.reference and a.run_reference:
        reference = write_config(out / "reference.yaml", common, []) if common else SMOKE
        print(json.dumps({"figure": "smoke_pipeline", "variant": "reference",
                          "wall_s": round(run_pipeline(reference, Path(a.reference), a.data, prepare), 1)}))  # fmt: skip
    wall = run_pipeline(config, out, a.data, prepare)
    summary = {"figure": "smoke_pipeline", "variant": a.args, "wall_s": round(wall, 1)}
    if not a.reference:
        print(json.dumps(summary))
        return 0
    ref, var = zero_shot(Path(a.reference)), zero_shot(out)
    worst = 0.0
    for name in sorted(ref):
        d = var[name] - ref[name] if name in var else None
        worst = max(worst, abs(d)) if d is not None else float("inf")
        print(json.dumps({"figure": "zero_shot_accuracy", "method": name, "reference": round(ref[name], 2),
                          "variant": round(var.get(name, float("nan")), 2),
                          "delta": None if d is None else round(d, 2)}))  # fmt: skip
    summary |= {"rows": len(ref), "max_abs_delta": worst, "tolerance": a.tolerance}
    print(json.dumps(summary))
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
