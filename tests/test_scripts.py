"""scripts/: the GPU check refuses to run without CUDA (it is never run here); the scripts parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_parses_and_refuses_to_run_without_cuda(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the check would run for minutes")
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()


def test_smoke_variant_script_describes_itself():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke_variant.py"), "--help"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "--reference" in out.stdout and "--tolerance" in out.stdout


def test_smoke_variant_configs_validate_by_steps_in_both_runs(tmp_path):
    """--validate-by-steps: every training stage kind validates at half its max_steps (whatever the dataset's
    size); the reference and the variant get the same arguments, the variant its own on top."""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("smoke_variant", REPO / "scripts" / "smoke_variant.py")
    sv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sv)
    common = sv.validation_by_steps()
    for kind, args in common.items():
        steps = OmegaConf.load(REPO / "conf" / "smoke" / f"{kind}.yaml").trainer.max_steps
        assert args == [
            "--trainer.check_val_every_n_epoch",
            "null",
            "--trainer.val_check_interval",
            str(steps // 2),
        ]
    ref = OmegaConf.load(sv.write_config(tmp_path / "ref.yaml", common, []))
    var = OmegaConf.load(
        sv.write_config(tmp_path / "var.yaml", common, ["--trainer.precision", "bf16-mixed"])
    )
    assert ref.launcher == var.launcher == "process"
    for kind in sv.KINDS:
        assert list(var.args[kind]) == [*ref.args[kind], "--trainer.precision", "bf16-mixed"]
    assert "--trainer.val_check_interval" in list(ref.args["hnet"])
    assert "--trainer.val_check_interval" not in list(ref.args["adapt"])  # predict has no validation


def test_profile_stages_accounts_for_the_whole_step(tmp_path):
    """scripts/profile_stages.py on toy sizes: per stage, its categories add up to the profiled step, and
    the padded-row fraction is that of the adapter calls' masks (between 0 and 1, none for guidance)."""
    import json

    out = tmp_path / "p.json"
    args = ["--dim", "16", "--hidden", "4", "--latent", "8", "--tasks", "3", "--steps", "1"]
    args += ["--guidance-tasks", "2", "--guidance-steps", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_stages.py"), *args],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"meta", "adapt", "eval", "guidance"}
    for name, st in res["stages"].items():
        ms = st["ms"]
        parts = sum(v for k, v in ms.items() if k != "padding")
        assert abs(parts - 1e3 * st["profiled_wall_s"]) <= 1e-6 * parts + 1e-3, name
        assert ms.get("padding", 0.0) <= ms.get("adapter", 0.0) + 1e-9
        pad = st["padded_fraction"]
        assert (pad is None) == (name == "guidance") and (pad is None or 0.0 <= pad < 1.0)
        assert f"== {name}:" in run.stdout
