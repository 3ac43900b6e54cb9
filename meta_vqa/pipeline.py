"""``meta-vqa pipeline``: the whole experiment in one command, resumable.

    prepare → base variants → hnet (→ cond_hnet) → adaptation dataset → hvae → hyperclip → hyperldm → report

for every split and seed of a pipeline YAML (``conf/<dataset>/pipeline.yaml``). Each stage is one
``meta-vqa fit|test|predict`` command built from the stage's own YAML (``configs``/<stage>.yaml) plus the
hand-off arguments (upstream checkpoint, adaptation dataset, output folder, seed, split), so what the
pipeline runs can always be run by hand (``--dry-run`` prints it).

Layout: ``OUT/<split>/seed<S>/<stage>/`` holds a stage's checkpoints (``best.ckpt``, ``last.ckpt``),
``results.json``/``.md`` and ``stage.json``; every stage logs to ``OUT/lightning_logs/<split>/seed<S>/<stage>``
(one TensorBoard for the run); the report goes to ``OUT/report/``.

Resuming: a stage is finished when its ``stage.json`` exists. The file records a hash of everything the
stage's result depends on: its command, the bytes of its YAML, the dataset manifest, and the run ids of
its upstream stages (a fresh id per completed run, so re-training the HNet makes everything downstream
stale). A re-run skips finished stages whose hash matches, and moves stale ones to ``OUT/_stale/`` (nothing
is deleted) before running them again. A stage that was killed resumes from its ``last.ckpt``.

On a cluster: ``--emit slurm`` writes the plan's pending stages as SLURM batch jobs instead of running them
(:mod:`meta_vqa.slurm`); the jobs' bookkeeping steps (``--job-begin``/``--job-end``) are this module's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meta_vqa.errors import ConfigError, MetaVQAError
from meta_vqa.eval.methods import BASE_VARIANTS, GENERATORS, GUIDANCE, guided_method
from meta_vqa.io import write_json
from meta_vqa.slurm import Resources, emit_slurm

log = logging.getLogger(__name__)

STAGE_KINDS = ("base", "hnet", "cond_hnet", "adapt", "hvae", "hyperclip", "hyperldm")
# cond_hnet (Conditional HNet-MAML) is an HNet stage: hnet.yaml with condition: question; it takes the hnet
# stage's `args` (the same budgets), then its own
HNET_LIKE = {"cond_hnet": "hnet"}
# guided stages may also get `args` of their own, after their kind's: a step size lives in its generator's
# latent units (the HVAE's latent is far wider than the HNet's)
GUIDED_STAGES = tuple(guided_method(g, k) for g in GENERATORS for k in GUIDANCE)
SPLITS = ("random", "family")
PREPARERS = ("easy-vqa", "synthetic", "meta-vqa")
STAMP, RUNNING = "stage.json", "stage.running.json"
# arguments that change what a stage shows, not what it computes: left out of its hash
DISPLAY_ARGS = ("--trainer.enable_progress_bar",)
# the hand-off arguments every stage gets from the plan; the short form of a command leaves them out
PLUMBING = (
    "--data.root", "--data.split", "--stage_dir", "--seed_everything", "--log_dir", "--log_name",
    "--test_after_fit", "--ckpt_path", "--data.adaptation", "--model.init_args.upstream_ckpt",
    "--model.init_args.hyperclip_ckpt", *DISPLAY_ARGS,
)  # fmt: skip
HPC_CKPT = "hpc_ckpt_*.ckpt"  # what Lightning saves on SLURM's time-limit signal (SLURMEnvironment)


@dataclass
class DataSection:
    root: str = "data/easy_vqa"
    prepare: str | None = "easy-vqa"  # builder run first (a built dataset is kept); None: root must exist
    prepare_args: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    configs: str | None = (
        None  # folder of the stage YAMLs (base, hnet, ...); None: the pipeline YAML's folder
    )
    out: str = "runs/easy_vqa"
    seeds: int = 1
    first_seed: int = 0
    splits: list[str] = field(default_factory=lambda: ["random"])
    data: DataSection = field(default_factory=DataSection)
    base_variants: list[str] = field(default_factory=lambda: list(BASE_VARIANTS))
    generators: list[str] = field(default_factory=lambda: ["hnet", "hvae"])
    guidance: list[str] = field(default_factory=lambda: ["hyperclip", "hyperldm"])
    combined: bool = True  # HyperLDM also gets the HyperCLIP checkpoint (combined guidance)
    cond_hnet: bool = False  # also Conditional HNet-MAML (stage cond_hnet), a baseline beside hnet_maml
    # extra command-line arguments per stage kind, then per guided stage (e.g. hvae_hyperclip)
    args: dict[str, list[str]] = field(default_factory=dict)
    launcher: str = "inline"  # inline: stages run in this process; process: one subprocess per stage
    progress_bar: bool = True  # each stage's live progress line (meta_vqa.progress)
    keep_last: bool = False  # keep a finished stage's last.ckpt (only an interrupted stage needs it)
    report: bool = True
    title: str = "Meta-VQA meta-test results"


@dataclass
class Stage:
    name: str  # "<split>/seed<S>/<stage>", also its folder under OUT and its TensorBoard run
    kind: str
    argv: list[str]
    dir: Path
    deps: list[str] = field(default_factory=list)
    config: Path | None = None
    outputs: list[str] = field(default_factory=list)  # files the stage must leave in its folder
    resumable: bool = False  # a fit: resume from last.ckpt


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """The pipeline YAML merged over the defaults, then ``key=value`` overrides; validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline config")
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(PipelineConfig),
            OmegaConf.load(path),
            OmegaConf.from_dotlist(list(overrides)),
        )
        cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{msg}") from None
    if cfg.configs is None:
        cfg.configs = str(path.parent)
    _validate(cfg, path)
    return cfg


def _validate(cfg: PipelineConfig, path: Path) -> None:
    def bad(key: str, value, allowed) -> None:
        raise ConfigError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, allowed))}")

    choices = [
        ("splits", cfg.splits, SPLITS),
        ("base_variants", cfg.base_variants, BASE_VARIANTS),
        ("generators", cfg.generators, GENERATORS),
        ("guidance", cfg.guidance, GUIDANCE),
        ("args", list(cfg.args), STAGE_KINDS + GUIDED_STAGES),
        ("launcher", [cfg.launcher], ("inline", "process")),
        ("data.prepare", [cfg.data.prepare] if cfg.data.prepare is not None else [], PREPARERS),
    ]
    for key, values, allowed in choices:
        for value in values:
            if value not in allowed:
                bad(key, value, allowed)
    if cfg.seeds < 1:
        raise ConfigError(f"{path}: seeds: must be at least 1, got {cfg.seeds}")
    configs = Path(cfg.configs)
    for kind in _kinds_used(cfg):
        f = configs / f"{kind}.yaml"
        if not f.is_file():
            raise ConfigError(f"{path}: configs: {f} does not exist")


def _kinds_used(cfg: PipelineConfig) -> list[str]:
    kinds = ["base"] if cfg.base_variants else []
    kinds += ["hnet", "adapt"]
    if "hvae" in cfg.generators:
        kinds.append("hvae")
    return kinds + list(cfg.guidance)


# --- the plan ---------------------------------------------------------------------------------------
def _seed_plan(cfg: PipelineConfig, r: Path) -> list[tuple[str, str, str, list[str], list[str]]]:
    """``(kind, name, verb, args, deps)`` of one split and seed, whose folder is ``r``."""
    ckpt = lambda stage: str(r / stage / "best.ckpt")
    tested = ["--test_after_fit", "true"]
    steps = []
    for v in cfg.base_variants:
        if v == "clip_zero_shot":  # nothing to train
            steps.append(("base", f"base/{v}", "test", ["--model.init_args.variant", v], []))
        else:
            steps.append(("base", f"base/{v}", "fit", ["--model.init_args.variant", v, *tested], []))
    steps.append(("hnet", "hnet", "fit", tested, []))
    if cfg.cond_hnet:  # an extra baseline; the later stages build on the unconditional hnet
        steps.append(
            ("cond_hnet", "cond_hnet", "fit", [*tested, "--model.init_args.condition", "question"], [])
        )
    steps.append(("adapt", "adaptation", "predict", ["--ckpt_path", ckpt("hnet")], ["hnet"]))
    data = ["--data.adaptation", str(r / "adaptation")]
    upstream = lambda gen: [*data, "--model.init_args.upstream_ckpt", ckpt(gen)]
    if "hvae" in cfg.generators:
        steps.append(("hvae", "hvae", "fit", [*tested, *upstream("hnet")], ["hnet", "adaptation"]))
    for gen in cfg.generators:
        if "hyperclip" in cfg.guidance:
            name = guided_method(gen, "hyperclip")
            steps.append(("hyperclip", name, "fit", [*tested, *upstream(gen)], [gen, "adaptation"]))
        if "hyperldm" in cfg.guidance:
            name, deps = guided_method(gen, "hyperldm"), [gen, "adaptation"]
            args = [*tested, *upstream(gen)]
            if cfg.combined and "hyperclip" in cfg.guidance:
                args += ["--model.init_args.hyperclip_ckpt", ckpt(guided_method(gen, "hyperclip"))]
                deps.append(guided_method(gen, "hyperclip"))
            steps.append(("hyperldm", name, "fit", args, deps))
    return steps


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every training/evaluation stage of the run, in an order that respects the hand-offs."""
    out, configs = Path(cfg.out), Path(cfg.configs)
    stages: list[Stage] = []
    for split in cfg.splits:
        for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
            prefix = f"{split}/seed{seed}"
            for kind, name, verb, args, deps in _seed_plan(cfg, out / prefix):
                config = configs / f"{HNET_LIKE.get(kind, kind)}.yaml"
                st = Stage(
                    f"{prefix}/{name}", kind, [], out / prefix / name, [f"{prefix}/{d}" for d in deps], config
                )
                st.resumable = verb == "fit"
                st.outputs = ["adaptation.json"] if kind == "adapt" else ["results.json"]
                if verb == "fit" and kind != "base":
                    st.outputs.append("best.ckpt")  # handed to the next stages
                common = ["--data.root", cfg.data.root, "--data.split", split, "--stage_dir", str(st.dir)]
                if kind != "adapt":  # the adaptation recipe has its own seed (data.adapt_seed); no logs
                    common += ["--seed_everything", str(seed)]
                    common += ["--trainer.enable_progress_bar", str(cfg.progress_bar).lower()]
                    common += ["--log_dir", str(out / "lightning_logs"), "--log_name", st.name]
                extra = [*cfg.args.get(HNET_LIKE.get(kind, ""), []), *cfg.args.get(kind, [])]
                if name in GUIDED_STAGES:
                    extra += cfg.args.get(name, [])
                st.argv = [verb, "-c", str(config), *common, *args, *extra]
                stages.append(st)
    return stages


# --- running ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def stage_hash(stage: Stage, upstream_runs: dict[str, str], data_digest: str) -> str:
    """What a stage's result depends on: its command, the bytes of its YAML and of the defaults it builds
    on, the data and its upstream runs. (Not ``META_VQA_PACKED_LINEAR``: the packed output layer gives the
    default layer's results bit for bit.)"""
    from meta_vqa.lightning_cli import default_files

    h = hashlib.sha256()
    argv = _without(stage.argv, DISPLAY_ARGS)
    h.update(json.dumps([argv, upstream_runs, data_digest], sort_keys=True).encode())
    if stage.config is not None and stage.config.is_file():
        for path in [*default_files(stage.config), stage.config]:
            h.update(path.read_bytes())
    return h.hexdigest()


def resume_point(folder: Path) -> Path | None:
    """The newest of a stage's ``last.ckpt`` and Lightning's ``hpc_ckpt_N.ckpt`` (None if neither)."""
    found = [p for p in [folder / "last.ckpt", *folder.glob(HPC_CKPT)] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _retire(stage: Stage, out: Path, why: str) -> None:
    """Move a stale or foreign stage folder to OUT/_stale/ (never delete a user's results)."""
    if not stage.dir.exists():
        return
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = out / "_stale" / f"{stage.name.replace('/', '__')}-{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage.dir), str(dest))
    log.info("   %s: %s; moved the old folder to %s", stage.name, why, dest)


def _launch(argv: list[str], launcher: str, what: str) -> int:
    """Run one ``meta-vqa`` command: in this process (``inline``) or in a subprocess (``process``)."""
    if launcher == "process":
        return subprocess.run([sys.executable, "-m", "meta_vqa", *argv]).returncode
    from meta_vqa.lightning_cli import run_stage
    from meta_vqa.prepare import main as prepare_main

    try:
        if argv[0] == "prepare":
            return prepare_main(argv[1:])
        return run_stage(argv)
    except MetaVQAError as e:
        raise type(e)(f"pipeline: {what}: {e}") from None
    except SystemExit as e:  # argparse exits on bad arguments (it has printed why)
        return e.code if isinstance(e.code, int) else 1


def _shell(argv: list[str]) -> str:
    import shlex

    return "meta-vqa " + " ".join(shlex.quote(a) for a in argv)


def _without(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """``argv`` without the ``--key value`` pairs of ``keys``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in keys:
            skip = True
        elif not a.startswith(tuple(f"{k}=" for k in keys)):
            out.append(a)
    return out


def short_command(argv: list[str]) -> str:
    """A stage's command without the hand-off arguments the plan adds to every stage (``…`` marks them)."""
    kept = _without(argv, PLUMBING)
    return _shell(kept) + (" …" if len(kept) < len(argv) else "")


class Pipeline:
    def __init__(
        self,
        cfg: PipelineConfig,
        only: list[str] | None = None,
        source: str | None = None,
        verbose: bool = False,
    ):
        self.cfg = cfg
        self.source = source  # the pipeline YAML, for the header
        self.verbose = verbose  # print each stage's whole command
        self.out = Path(cfg.out)
        self.stages = plan(cfg)
        if only:
            unknown = set(only) - set(STAGE_KINDS)
            if unknown:
                raise ConfigError(
                    f"--stages: unknown stage {sorted(unknown)[0]!r} (one of {', '.join(STAGE_KINDS)})"
                )
            self.stages = [s for s in self.stages if s.kind in only]
        self.summary: list[dict] = []

    def prepare_argv(self) -> list[str] | None:
        d = self.cfg.data
        if d.prepare is None:
            return None
        logs = ["--log-dir", str(self.out / "lightning_logs")] if d.prepare == "easy-vqa" else []
        return ["prepare", d.prepare, "--out", str(d.root), *logs, *d.prepare_args]

    def prepare(self, counter: str = "") -> str:
        """Build the dataset if the config names a builder; the digest of its manifest."""
        d = self.cfg.data
        root = Path(d.root)
        if d.prepare is not None:
            t0 = time.time()
            argv = self.prepare_argv()
            log.info("%s prepare  %s", counter, _shell(argv))
            rc = _launch(argv, self.cfg.launcher, "prepare")
            if rc != 0:
                raise MetaVQAError(
                    f"pipeline: `meta-vqa prepare {d.prepare} --out {root}` failed (exit {rc})"
                )
            self.summary.append({"stage": "prepare", "status": "ran", "wall_s": round(time.time() - t0, 1)})
        manifest = root / "dataset.json"
        if not manifest.is_file():
            raise MetaVQAError(f"{manifest}: no dataset here; set data.prepare or run `meta-vqa prepare`")
        return hashlib.sha256(manifest.read_bytes()).hexdigest()

    def data_digest(self) -> str | None:
        """sha256 of the dataset's manifest, None if the dataset is not built yet."""
        manifest = Path(self.cfg.data.root) / "dataset.json"
        return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None

    def stage(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        raise ConfigError(f"pipeline: no stage {name!r} in this plan")

    def job_begin(self, name: str) -> str:
        """A cluster job's first step (one process): ``finished``, ``run`` or ``resume CKPT`` (the
        ``--ckpt_path`` to add to the stage's command); see :meth:`begin_stage`."""
        st = self.stage(name)
        h = self.stage_hashes(self.data_digest())[name]
        if h is None:
            raise MetaVQAError(f"pipeline: stage {name} needs the dataset and its upstream stages finished")
        begun = self.begin_stage(st, h)
        if begun is None:
            log.info("%s: up to date, skipped", name)
            return "finished"
        status, argv = begun
        extra = argv[len(st.argv) :]
        return f"resume {extra[1]}" if extra[:1] == ["--ckpt_path"] else "run"

    def job_end(self, name: str) -> str:
        """A cluster job's last step: :meth:`finish_stage` with the hash :meth:`job_begin` recorded."""
        st = self.stage(name)
        running = _read_json(st.dir / RUNNING)
        if running is None:
            raise MetaVQAError(f"pipeline: {st.dir / RUNNING} is missing; the stage's job did not begin here")
        return self.finish_stage(st, running["hash"])

    # --- the plan and what a run would do ------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        """What a run would do with each stage, from the files on disk: ``done`` (skipped), ``stale``
        (its config, data or an upstream stage changed: re-run), ``resume`` (from its ``last.ckpt``),
        ``redo`` (an interrupted run with another config: re-run) or ``run``."""
        hashes = self.stage_hashes(self.data_digest())
        out = {}
        for st in self.stages:
            h = hashes[st.name]
            done, running = _read_json(st.dir / STAMP), _read_json(st.dir / RUNNING)
            if done is not None:
                out[st.name] = "done" if h is not None and done.get("hash") == h else "stale"
            elif running is not None and h is not None and running.get("hash") != h:
                out[st.name] = "redo"
            elif (
                running is not None
                and h is not None
                and ((st.resumable and resume_point(st.dir) is not None) or st.kind == "adapt")
            ):
                out[st.name] = "resume"
            else:
                out[st.name] = "run"
        return out

    def steps(self) -> list[tuple[str, str, list[str] | None]]:
        """Every step of a run in order, ``(name, status, argv)``: prepare, the stages, the report."""
        statuses = self.statuses()
        steps: list[tuple[str, str, list[str] | None]] = []
        prep = self.prepare_argv()
        if prep is not None:
            built = (Path(self.cfg.data.root) / "dataset.json").is_file()
            steps.append(("prepare", "check" if built else "build", prep))
        for st in self.stages:
            steps.append((st.name, statuses[st.name], st.argv))
        if self.cfg.report:
            steps.append(("report", "write", ["report", str(self.out)]))
        return steps

    def _status_text(self, name: str, status: str) -> str:
        st = next((s for s in self.stages if s.name == name), None)
        ckpt = resume_point(st.dir) if st is not None and status == "resume" else None
        return {
            "done": "done: skip",
            "stale": "stale: re-run",
            "redo": "interrupted, other config: re-run",
            "resume": f"resume from {ckpt.name}" if ckpt else "resume (finished parts kept)",
            "run": "to run",
            "check": "built: check, reuse",
            "build": "to build",
            "write": "to write",
        }.get(status, status)

    def print_plan(self) -> None:
        """``--dry-run``: the numbered steps with what a run would do with each, and their commands (whole
        with ``--verbose``); nothing is run or written."""
        steps = self.steps()
        print(self._header(steps))
        width = max(len(n) for n, _, _ in steps)
        digits = len(str(len(steps)))
        for i, (name, status, argv) in enumerate(steps, 1):
            cmd = _shell(argv) if name in ("prepare", "report") else short_command(argv)
            print(f"{i:>{digits}}. {name:<{width}}  {self._status_text(name, status):<22} {cmd}")
            if self.verbose and name not in ("prepare", "report"):
                print(f"{' ' * (digits + 2)}{_shell(argv)}")
        if not self.verbose:
            print("(… : the hand-off arguments every stage gets; --verbose prints whole commands)")

    def _header(self, steps: list[tuple[str, str, list[str] | None]]) -> str:
        cfg = self.cfg
        seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}"
        source = f"{self.source} → " if self.source else ""
        counts: dict[str, int] = {}
        for name, status, _ in steps:
            if name not in ("prepare", "report"):
                counts[status] = counts.get(status, 0) + 1
        words = {"run": "to run", "done": "done", "resume": "to resume", "stale": "stale", "redo": "to redo"}
        todo = ", ".join(f"{n} {words[k]}" for k, n in counts.items())
        return (
            f"meta-vqa pipeline: {source}{cfg.out}\n"
            f"   {len(steps)} steps: {'prepare, ' if cfg.data.prepare else ''}{len(self.stages)} stages "
            f"({', '.join(cfg.splits)} split{'s' if len(cfg.splits) > 1 else ''}, {seed_text}: {todo})"
            f"{', report' if cfg.report else ''}\n"
            f"   watch it: tensorboard --logdir {Path(cfg.out) / 'lightning_logs'}"
        )

    def run(self, dry_run: bool = False) -> list[dict]:
        if dry_run:
            self.print_plan()
            return []
        t_start = time.time()
        steps = self.steps()
        log.info("%s", self._header(steps))
        n, i = len(steps), 0
        counter = lambda: f"[{i}/{n}]"
        if self.cfg.data.prepare is not None:
            i += 1
        digest = self.prepare(counter())
        run_ids: dict[str, str] = {}
        for st in self.stages:
            i += 1
            missing = [d for d in st.deps if d not in run_ids and not self._finished_elsewhere(d, run_ids)]
            if missing:
                raise MetaVQAError(f"pipeline: stage {st.name} needs {missing[0]}, which is not finished")
            h = stage_hash(st, {d: run_ids[d] for d in st.deps}, digest)
            run_ids[st.name] = self._run_stage(st, h, counter())
            self._write_summary(t_start)
        if self.cfg.report:
            from meta_vqa.eval.report import build_report

            i += 1
            log.info("%s report  %s", counter(), self.out / "report")
            t0 = time.time()
            build_report(
                self.out, self.out / "report", self.cfg.title, self.cfg.data.root,
                tensorboard_dir=self.out / "lightning_logs" / "report", echo="claims",
            )  # fmt: skip
            self.summary.append({"stage": "report", "status": "ran", "wall_s": round(time.time() - t0, 1)})
        self._write_summary(t_start)
        log.info("%s", self._footer(time.time() - t_start))
        return self.summary

    def _footer(self, wall: float) -> str:
        from meta_vqa.progress import duration

        stages = [s for s in self.summary if s["stage"] not in ("prepare", "report")]
        ran = sum(s["status"] != "skipped" for s in stages)
        extra = [x for x in ("prepare", "report") if any(s["stage"] == x for s in self.summary)]
        lines = [
            f"pipeline done in {duration(wall)}: {ran} stage{'s' if ran != 1 else ''} run, "
            f"{len(stages) - ran} skipped" + (f" (and {' and '.join(extra)})" if extra else "")
        ]
        report = self.out / "report" / "results.md"
        if self.cfg.report and report.is_file():
            plots = len(list(report.parent.glob("*.png")))
            lines.append(f"   report:       {report}" + (f" ({plots} plots beside it)" if plots else ""))
        lines.append(f"   TensorBoard:  tensorboard --logdir {self.out / 'lightning_logs'}")
        example = self._generate_example()
        if example:
            lines.append(f"   generate:     {example}")
        lines.append(f"   summary:      {self.out / 'pipeline.json'}")
        return "\n".join(lines)

    def _generate_example(self) -> str | None:
        """A ``meta-vqa generate`` command for one of the run's meta-test questions (None where the run
        has no HyperLDM or the dataset no CLIP to encode a question)."""
        import shlex

        root = Path(self.cfg.data.root)
        if "hyperldm" not in self.cfg.guidance or not (root / "clip").is_dir():
            return None
        from meta_vqa.data.tasks import load_tasks  # the task-file format (data layer)

        path = root / "meta_test.json"
        tasks = load_tasks(path) if path.is_file() else []
        if not tasks:
            return None
        question, answers = tasks[0].question, sorted(tasks[0].answers)
        if len(answers) < 2 or len(answers) > 6:
            return None
        return (
            f"meta-vqa generate --run {shlex.quote(str(self.out))} --question {shlex.quote(question)} "
            f"--answers {shlex.quote(','.join(answers))}"
        )

    def _finished_elsewhere(self, name: str, run_ids: dict[str, str]) -> bool:
        """With --stages, an upstream stage outside the selection counts if it finished earlier."""
        rec = _read_json(self.out / name / STAMP)
        if rec and rec.get("run_id"):
            run_ids[name] = rec["run_id"]
            return True
        return False

    def stage_hashes(self, digest: str | None) -> dict[str, str | None]:
        """The hash of every stage whose upstream stages are all finished (the others: None), from the
        ``stage.json`` files on disk; ``digest`` None (no dataset yet): every hash is None."""
        run_ids: dict[str, str] = {}
        hashes: dict[str, str | None] = {}
        planned = {st.name for st in self.stages}
        for st in self.stages:
            ready = digest is not None and all(
                d in run_ids or (d not in planned and self._finished_elsewhere(d, run_ids)) for d in st.deps
            )
            hashes[st.name] = stage_hash(st, {d: run_ids[d] for d in st.deps}, digest) if ready else None
            done = _read_json(st.dir / STAMP)
            if ready and done is not None and done.get("hash") == hashes[st.name]:
                run_ids[st.name] = done["run_id"]
        return hashes

    def finished_stages(self, hashes: dict[str, str | None]) -> set[str]:
        """The stages whose ``stage.json`` holds their current hash (see :meth:`stage_hashes`)."""
        return {
            st.name
            for st in self.stages
            if hashes[st.name] is not None
            and (_read_json(st.dir / STAMP) or {}).get("hash") == hashes[st.name]
        }

    def begin_stage(self, st: Stage, h: str) -> tuple[str, list[str]] | None:
        """Before a stage runs: None if it is finished with this hash; else retire a stale or foreign
        folder, record the run in ``stage.running.json``, and return ``(status, argv)``: ``ran``, or
        ``resumed`` with ``--ckpt_path`` the newest resume point (``last.ckpt``, or the checkpoint
        Lightning writes when SLURM signals the time limit, ``hpc_ckpt_N.ckpt``)."""
        done = _read_json(st.dir / STAMP)
        if done is not None:
            if done.get("hash") == h:
                return None
            _retire(st, self.out, "its config or an upstream stage changed")
        argv, status = list(st.argv), "ran"
        running = _read_json(st.dir / RUNNING)
        if running is not None:
            if running.get("hash") != h:
                _retire(st, self.out, "an interrupted run with another config")
            elif st.resumable and (ckpt := resume_point(st.dir)) is not None:
                argv += ["--ckpt_path", str(ckpt)]
                status = "resumed"
            elif st.kind == "adapt":
                status = "resumed"  # the adaptation writer keeps its finished parts
        started = dt.datetime.now().isoformat(timespec="seconds")
        write_json(st.dir / RUNNING, {"hash": h, "argv": argv, "started": started, "status": status})
        return status, argv

    def finish_stage(self, st: Stage, h: str, wall: float | None = None) -> str:
        """After a stage ran: check its outputs, drop its resume points, write ``stage.json``; its run id."""
        running = _read_json(st.dir / RUNNING) or {}
        if wall is None:  # a cluster job: from the start time recorded by begin_stage
            started = running.get("started")
            wall = round(time.time() - dt.datetime.fromisoformat(started).timestamp(), 1) if started else 0.0
        absent = [f for f in st.outputs if not (st.dir / f).exists()]
        if absent:
            raise MetaVQAError(
                f"pipeline: stage {st.name} finished without writing {st.dir / absent[0]} "
                f"(check {st.config}: e.g. trainer.check_val_every_n_epoch must allow at least one validation)"
            )
        if not self.cfg.keep_last and (st.dir / "best.ckpt").is_file():
            (st.dir / "last.ckpt").unlink(missing_ok=True)  # the resume point of an unfinished stage only
        for hpc in st.dir.glob(HPC_CKPT):  # Lightning's checkpoints at a SLURM time-limit signal
            hpc.unlink()
        run_id = uuid.uuid4().hex
        status = running.get("status", "ran")
        rec = {
            "hash": h,
            "run_id": run_id,
            "argv": running.get("argv", st.argv),
            "started": running.get("started"),
            "wall_s": wall,
            "status": status,
        }
        write_json(st.dir / STAMP, rec)
        (st.dir / RUNNING).unlink(missing_ok=True)
        from meta_vqa.progress import duration

        log.info(
            "   %s: %s in %s", st.name, "resumed and done" if status == "resumed" else "done", duration(wall)
        )
        self.summary.append({"stage": st.name, "status": status, "wall_s": wall})
        return run_id

    def _run_stage(self, st: Stage, h: str, counter: str) -> str:
        begun = self.begin_stage(st, h)
        if begun is None:
            log.info("%s %s: up to date, skipped", counter, st.name)
            self.summary.append({"stage": st.name, "status": "skipped", "wall_s": 0.0})
            return _read_json(st.dir / STAMP)["run_id"]
        status, argv = begun
        resumed = (
            f" (resuming from {Path(argv[-1]).name})"
            if status == "resumed" and "--ckpt_path" in argv[-2:]
            else ""
        )
        log.info("%s %s%s  %s", counter, st.name, resumed, short_command(st.argv))
        if self.verbose:
            log.info("   %s", _shell(argv))
        t0 = time.time()
        rc = _launch(argv, self.cfg.launcher, f"stage {st.name}")
        wall = round(time.time() - t0, 1)
        if rc != 0:
            raise MetaVQAError(
                f"pipeline: stage {st.name} failed (exit {rc}); fix the cause and rerun the same command "
                "to continue from there"
            )
        return self.finish_stage(st, h, wall)

    def _write_summary(self, t_start: float) -> None:
        write_json(
            self.out / "pipeline.json",
            {"config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
             "data_root": str(Path(self.cfg.data.root).resolve()),
             "wall_s": round(time.time() - t_start, 1), "stages": self.summary},
        )  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meta-vqa pipeline",
        description="prepare → base → hnet (→ cond_hnet) → adaptation → hvae → hyperclip → hyperldm → report, "
        "resumable.",
    )
    p.add_argument("-c", "--config", required=True, help="pipeline YAML, e.g. conf/easy_vqa/pipeline.yaml")
    p.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (0, 1, ...; default: the config's)"
    )
    p.add_argument("--out", default=None, help="run folder (default: the config's)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=None, help="task splits to run")
    p.add_argument(
        "--stages", nargs="+", default=None, help=f"only these stage kinds ({', '.join(STAGE_KINDS)})"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the numbered plan (prepare, every stage, report) with what a run would do with each "
        "(skip as done, resume from last.ckpt, re-run as stale, run) and stop",
    )
    p.add_argument(
        "--verbose", action="store_true", help="print each stage's whole command (in the plan and the run)"
    )
    cluster = p.add_argument_group(
        "cluster batch jobs",
        "--emit slurm writes one sbatch script per pending stage and submit.sh (nothing is submitted)",
    )
    cluster.add_argument(
        "--emit", choices=("slurm",), default=None, help="write batch jobs instead of running"
    )
    cluster.add_argument("--out-scripts", default=None, help="folder of the scripts (default: OUT/slurm)")
    cluster.add_argument("--partition", default=None, help="SLURM partition")
    cluster.add_argument("--gpus", type=int, default=1, help="GPUs per node, one task each (0: CPU jobs)")
    cluster.add_argument("--nodes", type=int, default=1, help="nodes per stage job")
    cluster.add_argument("--time", default=None, help="time limit per job, e.g. 04:00:00")
    cluster.add_argument("--account", default=None, help="SLURM account")
    cluster.add_argument(
        "--setup", action="append", default=[], help="a shell line run first in every job (repeatable)"
    )
    cluster.add_argument("--job-begin", metavar="STAGE", default=None, help=argparse.SUPPRESS)
    cluster.add_argument("--job-end", metavar="STAGE", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. launcher=process)")
    args = p.parse_args(argv)
    over = list(args.overrides)
    if args.seeds is not None:
        over.append(f"seeds={args.seeds}")
    if args.out is not None:
        over.append(f"out={args.out}")
    if args.splits is not None:
        over.append(f"splits=[{','.join(args.splits)}]")
    cfg = load_config(args.config, over)
    pipe = Pipeline(cfg, args.stages, source=args.config, verbose=args.verbose)
    if args.job_begin or args.job_end:  # the bookkeeping steps of a batch job (meta_vqa.slurm)
        print(pipe.job_begin(args.job_begin) if args.job_begin else pipe.job_end(args.job_end))
        return 0
    if args.emit == "slurm":
        res = Resources(args.gpus, args.nodes, args.partition, args.time, args.account, args.setup)
        emit_slurm(pipe, args.out_scripts or Path(cfg.out) / "slurm", res)
        return 0
    pipe.run(dry_run=args.dry_run)
    return 0
