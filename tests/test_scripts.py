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


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_zero_shot_answers_reproduces_the_stage_zero_shot_accuracy(smoke_hnet, capsys):
    """The script's zero-shot accuracy is the one the HNet stage's test wrote (the same weights, the same
    tasks), its counts are consistent, and a checkpoint compared with itself differs on no task."""
    import json

    zs = _script("zero_shot_answers")
    ckpt = str(smoke_hnet["ckpt"])
    assert zs.main([ckpt, ckpt, "--diff", "--json", "--data-root", str(smoke_hnet["root"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first, second = (json.loads(line) for line in lines[:2])
    assert lines[2:] == []  # --diff of a checkpoint with itself: no task differs
    assert first == second
    (record,) = [r for r in smoke_hnet["results"] if r["method"] == "hnet_maml" and r["shots"] == 0]
    assert first["zero_shot_accuracy"] == pytest.approx(record["accuracy"], abs=1e-4)
    assert first["tasks"] == record["n_tasks"]
    assert 0 <= first["tasks_one_answer_for_all"] <= first["tasks"]
    assert 0 < first["mean_modal_share"] <= 1
    assert 0 < first["most_given_answer_share"] <= 1


def test_zero_shot_answers_summary_counts_constant_answers():
    zs = _script("zero_shot_answers")
    tasks = {
        0: zs.TaskAnswers(0.9, "yes", 1.0, {"yes": 9, "no": 1}, {"yes": 10}),
        1: zs.TaskAnswers(0.1, "yes", 1.0, {"yes": 1, "no": 9}, {"yes": 10}),
        2: zs.TaskAnswers(0.5, "red", 0.5, {"red": 2, "blue": 2}, {"red": 2, "blue": 2}),
    }
    s = zs.summary(tasks)
    assert s == {
        "zero_shot_accuracy": pytest.approx(100 * 1.5 / 3),
        "tasks": 3,
        "tasks_one_answer_for_all": 2,
        "mean_modal_share": pytest.approx(2.5 / 3),
        "most_given_answer": "yes",
        "most_given_answer_share": pytest.approx(20 / 24),
    }


def test_zero_shot_answers_names_a_missing_checkpoint(tmp_path, capsys):
    zs = _script("zero_shot_answers")
    missing = tmp_path / "nope.ckpt"
    assert zs.main([str(missing)]) == 2
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err


def test_packed_ab_times_both_layers_and_finds_the_same_latents(tmp_path):
    """scripts/packed_ab.py on toy sizes (every layer packed): both sides timed the asked number of calls
    of each kind, the packed kernel was available, and the two sides adapted identical latents."""
    import json

    out = tmp_path / "ab.json"
    args = ["--dim", "16", "--hidden", "4", "--latent", "8", "--tasks", "8", "--steps", "2", "--calls", "3"]
    args += ["--min-weights", "0", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "packed_ab.py"), *args],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())
    assert res["latents_identical"] is True and res["D"] == 2 * 16 * 4 + 4 + 16
    for kind in ("meta", "adapt"):
        calls = res[kind]["calls_s"]
        assert set(calls) == {"default", "packed"} and all(len(v) == 3 for v in calls.values())
        assert res[kind]["ratio"] == res[kind]["median_s"]["default"] / res[kind]["median_s"]["packed"]
    if res["packs"]:
        assert isinstance(res["exact_from"], int) and res["exact_from"] >= 1
    assert "adapted latents identical on both sides: yes" in run.stdout
