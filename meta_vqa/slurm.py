"""``meta-vqa pipeline ... --emit slurm --out-scripts DIR``: the pipeline as SLURM batch jobs.

One ``sbatch`` script per pending stage and a ``submit.sh`` that submits them in order, each with
``--dependency=afterok:`` on the jobs of the stages it needs; finished stages (``stage.json`` with the
current hash, as :class:`~meta_vqa.pipeline.Pipeline` decides) get no job. The dataset is built by its own
job first when it is not there yet; a report job comes last.

Each stage job runs, in the batch step (one process): ``meta-vqa pipeline -c DIR/pipeline.yaml
--job-begin STAGE`` (skip if finished, move stale folders aside, record the run, name the resume point),
then the stage's command exactly as ``--dry-run`` prints it under ``srun`` with one task per GPU and the
device counts appended (``--trainer.devices``, ``--trainer.num_nodes``, DDP when there is more than one);
Lightning's ``SLURMEnvironment`` takes the ranks from srun. Then ``--job-end STAGE`` checks the outputs and
writes ``stage.json``. ``#SBATCH --signal=SIGUSR1@90`` and ``--requeue``: 90 s before the time limit
Lightning saves ``hpc_ckpt_N.ckpt`` into the stage folder and requeues the job; the requeued job resumes
from the newest of that and ``last.ckpt`` (``--job-begin`` names it).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from meta_vqa.errors import ConfigError

log = logging.getLogger(__name__)

ENV = ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "TOKENIZERS_PARALLELISM=false")
SIGNAL_BEFORE_LIMIT_S = 90


class Stage(Protocol):
    """What a job needs of one stage of the plan (:class:`meta_vqa.pipeline.Stage`)."""

    name: str
    argv: list[str]
    deps: list[str]


class Plan(Protocol):
    """What the scripts are written from (:class:`meta_vqa.pipeline.Pipeline`, which calls this module)."""

    cfg: Any  # the PipelineConfig: data, out, report, title
    stages: list[Stage]

    def data_digest(self) -> str | None: ...

    def stage_hashes(self, digest: str | None) -> dict[str, str | None]: ...

    def finished_stages(self, hashes: dict[str, str | None]) -> set[str]: ...


@dataclass
class Resources:
    """What every stage job asks SLURM for: ``gpus`` per node (one task each; 0 = a CPU job, one task),
    ``nodes``, and optionally ``partition``, ``time`` (the limit, e.g. ``04:00:00``) and ``account``;
    ``setup``: shell lines run before the commands (e.g. ``source activate meta_vqa``)."""

    gpus: int = 1
    nodes: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.nodes < 1:
            raise ConfigError(f"--gpus {self.gpus} --nodes {self.nodes}: need gpus >= 0 and nodes >= 1")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus, 1)

    def trainer_args(self) -> list[str]:
        """The device counts appended to a stage's command (they match the tasks srun starts)."""
        args = ["--trainer.accelerator", "gpu" if self.gpus else "cpu"]
        args += ["--trainer.devices", str(self.tasks_per_node), "--trainer.num_nodes", str(self.nodes)]
        if self.tasks_per_node * self.nodes > 1:
            args += ["--trainer.strategy", "ddp"]
        return args


def _q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _job_name(name: str) -> str:
    return "mvqa-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60]


def _header(name: str, logs: Path, res: Resources, nodes: int, tasks: int, gpus: int) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={_job_name(name)}",
        f"#SBATCH --output={logs}/%x-%j.out",
        "#SBATCH --open-mode=append",  # a requeued job appends to the same log
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
    ]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    for key in ("partition", "time", "account"):
        if getattr(res, key):
            lines.append(f"#SBATCH --{key}={getattr(res, key)}")
    return lines


def _preamble(workdir: Path, res: Resources) -> list[str]:
    return [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        *res.setup,
        *(f"export {e}" for e in ENV),
    ]


def stage_script(st: Stage, config: Path, workdir: Path, logs: Path, res: Resources) -> str:
    """The batch script of one stage (module docstring)."""
    lines = _header(st.name, logs, res, res.nodes, res.tasks_per_node, res.gpus)
    lines += [
        f"#SBATCH --signal=SIGUSR1@{SIGNAL_BEFORE_LIMIT_S}",  # Lightning saves and requeues on it
        "#SBATCH --requeue",
        "",
        f"# stage {st.name}: the command of `meta-vqa pipeline --dry-run`, one task per GPU",
        *_preamble(workdir, res),
        f"state=$(meta-vqa pipeline -c {shlex.quote(str(config))} --job-begin {shlex.quote(st.name)})",
        'if [ "$state" = finished ]; then exit 0; fi',
        "RESUME=()",
        'case "$state" in resume\\ *) RESUME=(--ckpt_path "${state#resume }") ;; esac',
        f'srun meta-vqa {_q(st.argv)} {_q(res.trainer_args())} ${{RESUME[@]+"${{RESUME[@]}}"}}',
        f"meta-vqa pipeline -c {shlex.quote(str(config))} --job-end {shlex.quote(st.name)}",
        "",
    ]
    return "\n".join(lines)


def prepare_script(argv: list[str], workdir: Path, logs: Path, res: Resources) -> str:
    """The dataset build: one process (one GPU for the CLIP of easy-vqa, if GPUs are asked for)."""
    lines = _header("prepare", logs, res, 1, 1, min(res.gpus, 1))
    lines += ["", "# the dataset (kept if already built)", *_preamble(workdir, res)]
    lines += [f"srun meta-vqa {_q(argv)}", ""]
    return "\n".join(lines)


def report_script(out: str, title: str, workdir: Path, logs: Path, res: Resources) -> str:
    lines = _header("report", logs, res, 1, 1, 0)
    lines += ["", "# tables, claims and plots of the run", *_preamble(workdir, res)]
    lines += [f"meta-vqa report {_q([out, '--out', str(Path(out) / 'report'), '--title', title])}", ""]
    return "\n".join(lines)


def emit_slurm(pipe: Plan, scripts: str | Path, res: Resources) -> Path:
    """Write the batch scripts and ``submit.sh`` of ``pipe``'s pending stages into ``scripts``; returns
    the path of ``submit.sh``. Nothing is submitted."""
    cfg = pipe.cfg
    scripts, workdir = Path(scripts).resolve(), Path.cwd().resolve()
    logs = scripts / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in scripts.glob("*.sbatch"):
        old.unlink()
    config = scripts / "pipeline.yaml"  # the resolved pipeline config the jobs' bookkeeping reads
    OmegaConf.save(OmegaConf.structured(cfg), config)
    digest = pipe.data_digest()
    hashes = pipe.stage_hashes(digest)
    finished = pipe.finished_stages(hashes)
    submit = [
        "#!/bin/bash",
        "# Submits the pending stages of the pipeline, each after the jobs of the stages it needs.",
        "# Written by `meta-vqa pipeline --emit slurm`; finished stages have no job.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "submit() {  # prints the job id of `sbatch ARGS...`",
        '  local out; out=$(sbatch "$@"); out=${out##* }; echo "${out%%;*}"',
        "}",
    ]
    jobs: dict[str, str] = {}  # stage name (or "prepare") -> shell variable holding its job id
    first: list[str] = []
    if cfg.data.prepare is not None and digest is None:
        argv = ["prepare", cfg.data.prepare, "--out", cfg.data.root, *cfg.data.prepare_args]
        (scripts / "00-prepare.sbatch").write_text(prepare_script(argv, workdir, logs, res))
        submit.append("J0=$(submit 00-prepare.sbatch)")
        jobs["prepare"] = "J0"
        first = ["prepare"]
    elif digest is None:
        raise ConfigError(f"{cfg.data.root}/dataset.json: no dataset and no data.prepare builder")
    n = 0
    for i, st in enumerate(pipe.stages, 1):
        if st.name in finished:
            continue
        name = f"{i:02d}-{st.name.replace('/', '__')}.sbatch"
        (scripts / name).write_text(stage_script(st, config, workdir, logs, res))
        after = first + [d for d in st.deps if d in jobs]
        dep = f"--dependency=afterok:{':'.join('$' + jobs[d] for d in after)} " if after else ""
        var = f"J{i}"
        submit.append(f"{var}=$(submit {dep}{name})")
        jobs[st.name] = var
        n += 1
    if cfg.report:
        (scripts / "99-report.sbatch").write_text(report_script(cfg.out, cfg.title, workdir, logs, res))
        after = [v for k, v in jobs.items()]
        dep = f"--dependency=afterok:{':'.join('$' + v for v in after)} " if after else ""
        submit.append(f"J99=$(submit {dep}99-report.sbatch)")
    submit.append('echo "submitted: $(ls -1 *.sbatch | wc -l) jobs"')
    path = scripts / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    for p in [path, *scripts.glob("*.sbatch")]:
        os.chmod(p, 0o755)
    log.info(
        "%s: %d stage jobs (%d finished stages skipped)%s; run it to submit",
        path, n, len(finished), ", dataset job first" if first else "",
    )  # fmt: skip
    return path
