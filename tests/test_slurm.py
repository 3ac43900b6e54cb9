"""meta-vqa pipeline --emit slurm: one batch script per pending stage, chained by afterok in submit.sh (checked
with a fake sbatch), finished stages skipped; the jobs' bookkeeping steps (begin, resume point, end)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from meta_vqa.io import write_json
from meta_vqa.pipeline import STAMP, Pipeline, _shell, load_config, main
from meta_vqa.slurm import Resources, emit_slurm

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke" / "pipeline.yaml"
FAKE_SBATCH = """#!/bin/bash
# prints what sbatch prints and logs its arguments, one call per line
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 101 ))
echo "$*" >> "$SBATCH_LOG"
echo "Submitted batch job $n"
"""


def _pipeline(tmp_path: Path, root: Path) -> Pipeline:
    return Pipeline(load_config(SMOKE, [f"out={tmp_path / 'run'}", f"data.root={root}"]))


def _finish(pipe: Pipeline, names: list[str]) -> None:
    """Mark stages finished as the pipeline would: stage.json with the stage's current hash."""
    for name in names:
        h = pipe.stage_hashes(pipe.data_digest())[name]
        assert h is not None, name
        write_json(pipe.stage(name).dir / STAMP, {"hash": h, "run_id": uuid.uuid4().hex})


def _submit(scripts: Path, tmp_path: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(log)}
    out = subprocess.run(["bash", str(scripts / "submit.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines()


def _deps(call: str) -> set[int]:
    m = re.search(r"--dependency=afterok:([\d:]+)", call)
    return {int(j) for j in m.group(1).split(":")} if m else set()


def test_emitted_scripts_chain_the_pending_stages_and_skip_finished_ones(
    synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    pipe = _pipeline(tmp_path, synthetic_root)
    finished = [s.name for s in pipe.stages if s.kind == "base"] + ["random/seed0/hnet"]
    _finish(pipe, finished)
    res = Resources(gpus=4, nodes=2, partition="gpu", time="02:00:00", account="lab")
    submit = emit_slurm(pipe, tmp_path / "jobs", res)
    scripts = sorted(p.name for p in submit.parent.glob("*.sbatch"))
    pending = [s for s in pipe.stages if s.name not in finished]
    assert len(scripts) == len(pending) + 1 and scripts[-1] == "99-report.sbatch"  # no prepare: data built
    for p in submit.parent.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0, p
    assert subprocess.run(["bash", "-n", str(submit)]).returncode == 0
    for st in pending:  # each script runs the --dry-run command under srun, with the device counts
        text = next(submit.parent.glob(f"*-{st.name.replace('/', '__')}.sbatch")).read_text()
        dry = _shell(st.argv).removeprefix("meta-vqa ")
        assert (
            f"srun meta-vqa {dry} --trainer.accelerator gpu --trainer.devices 4 --trainer.num_nodes 2" in text
        )
        assert "--trainer.strategy ddp" in text
        for line in ("--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--partition=gpu",
                     "--time=02:00:00", "--account=lab", "--signal=SIGUSR1@90", "--requeue"):  # fmt: skip
            assert f"#SBATCH {line}" in text, line

    calls = _submit(submit.parent, tmp_path)
    assert len(calls) == len(scripts)
    job = {c.split()[-1]: 101 + i for i, c in enumerate(calls)}  # script -> the id the fake printed
    name_of = {f"{i:02d}-{s.name.replace('/', '__')}.sbatch": s for i, s in enumerate(pipe.stages, 1)}
    for call in calls:
        script = call.split()[-1]
        if script == "99-report.sbatch":
            assert _deps(call) == {job[s] for s in job if s != script}
            continue
        st = name_of[script]
        want = {job[n] for n, s in name_of.items() if s.name in st.deps and s.name not in finished}
        assert _deps(call) == want, (st.name, call)
        assert all(j < job[script] for j in _deps(call))  # the jobs it waits for were submitted before
    hvae = next(c for c in calls if c.endswith("hvae.sbatch"))
    adaptation = job[next(n for n, s in name_of.items() if s.name == "random/seed0/adaptation")]
    assert _deps(hvae) == {adaptation}  # hnet is finished: only the adaptation job is waited for


def test_without_a_dataset_the_prepare_job_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = _pipeline(tmp_path, tmp_path / "data")
    submit = emit_slurm(pipe, tmp_path / "jobs", Resources(gpus=0))
    prepare = (submit.parent / "00-prepare.sbatch").read_text()
    assert f"srun meta-vqa prepare synthetic --out {tmp_path / 'data'}" in prepare
    assert "--gres" not in prepare and "#SBATCH --ntasks-per-node=1" in prepare
    calls = _submit(submit.parent, tmp_path)
    assert calls[0] == "00-prepare.sbatch"
    assert all(101 in _deps(c) for c in calls[1:])  # everything waits for the dataset
    stage = (submit.parent / "01-random__seed0__base__clip_zero_shot.sbatch").read_text()
    assert "--trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 1" in stage
    assert "--trainer.strategy" not in stage  # one process: no DDP


def test_emit_from_the_command_line(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(SMOKE), "--out", str(tmp_path / "run"), f"data.root={synthetic_root}"]
    assert (
        main(
            [*args, "--emit", "slurm", "--out-scripts", "jobs", "--gpus", "2", "--setup", "module load cuda"]
        )
        == 0
    )
    text = (tmp_path / "jobs" / "06-random__seed0__hnet.sbatch").read_text()
    assert "module load cuda" in text and "--ntasks-per-node=2" in text
    assert f"cd {tmp_path}" in text and f"-c {tmp_path / 'jobs' / 'pipeline.yaml'} --job-begin" in text


def test_job_steps_skip_finished_stages_and_resume_from_the_newest_checkpoint(
    synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    pipe = _pipeline(tmp_path, synthetic_root)
    zero_shot, hnet = "random/seed0/base/clip_zero_shot", "random/seed0/hnet"
    assert pipe.job_begin(zero_shot) == "run"
    with pytest.raises(Exception, match="results.json"):
        pipe.job_end(zero_shot)  # the stage wrote nothing: not finished
    (pipe.stage(zero_shot).dir / "results.json").write_text("[]")
    run_id = pipe.job_end(zero_shot)
    assert json.loads((pipe.stage(zero_shot).dir / STAMP).read_text())["run_id"] == run_id
    assert pipe.job_begin(zero_shot) == "finished"
    # a requeued fit: the newest of last.ckpt and Lightning's hpc_ckpt_N.ckpt
    d = pipe.stage(hnet).dir
    assert pipe.job_begin(hnet) == "run"
    (d / "last.ckpt").write_text("x")
    time.sleep(0.01)
    (d / "hpc_ckpt_1.ckpt").write_text("x")
    assert pipe.job_begin(hnet) == f"resume {d / 'hpc_ckpt_1.ckpt'}"
    (d / "results.json").write_text("[]")
    (d / "best.ckpt").write_text("x")
    pipe.job_end(hnet)
    assert not (d / "last.ckpt").exists() and not list(d.glob("hpc_ckpt_*"))  # resume points dropped
    with pytest.raises(Exception, match="upstream"):
        pipe.job_begin("random/seed0/hvae")  # its adaptation dataset is not made


def test_a_stage_script_resumes_through_srun(synthetic_root, tmp_path, monkeypatch):
    """The script with stand-ins for meta-vqa and srun: begin says resume, the command gets --ckpt_path."""
    monkeypatch.chdir(tmp_path)
    pipe = _pipeline(tmp_path, synthetic_root)
    submit = emit_slurm(pipe, tmp_path / "jobs", Resources(gpus=2))
    script = submit.parent / "06-random__seed0__hnet.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$LOG"\n"$@"\n')
    (bin_dir / "meta-vqa").write_text(
        '#!/bin/bash\necho "meta-vqa $*" >> "$LOG"\n'
        'case "$*" in *--job-begin*) echo "resume /ck/last.ckpt" ;; *--job-end*) echo id ;; esac\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    lines = log.read_text().splitlines()
    assert "--job-begin random/seed0/hnet" in lines[0] and "--job-end random/seed0/hnet" in lines[-1]
    assert lines[1].startswith("srun meta-vqa fit") and lines[1].endswith(
        "--trainer.strategy ddp --ckpt_path /ck/last.ckpt"
    )
