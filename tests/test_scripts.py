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
