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
