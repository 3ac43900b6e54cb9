"""meta-vqa pipeline: the stage plan and its hand-offs, the whole smoke chain end to end with its report,
resuming after a kill, re-running only stale stages."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meta_vqa.errors import ConfigError
from meta_vqa.pipeline import Pipeline, load_config, plan

REPO = Path(__file__).resolve().parents[1]
EASY = REPO / "conf" / "easy_vqa" / "pipeline.yaml"
SMOKE = REPO / "conf" / "smoke" / "pipeline.yaml"


def _arg(argv: list[str], key: str) -> str:
    return argv[argv.index(key) + 1]


def test_plan_hands_every_checkpoint_to_the_next_stage(tmp_path):
    cfg = load_config(EASY, [f"out={tmp_path}", "seeds=2", "splits=[random,family]"])
    stages = {s.name: s for s in plan(cfg)}
    # base variants, hnet, cond_hnet, adaptation, hvae, {hnet,hvae} x {hyperclip,hyperldm}
    per_seed = 5 + 1 + 1 + 1 + 1 + 2 * 2
    assert len(stages) == 2 * 2 * per_seed
    r = tmp_path / "family" / "seed1"
    hnet = stages["family/seed1/hnet"].argv
    assert hnet[:3] == ["fit", "-c", str(REPO / "conf" / "easy_vqa" / "hnet.yaml")]
    assert _arg(hnet, "--data.split") == "family" and _arg(hnet, "--seed_everything") == "1"
    assert _arg(hnet, "--stage_dir") == str(r / "hnet")
    assert _arg(hnet, "--log_dir") == str(tmp_path / "lightning_logs")
    assert _arg(hnet, "--log_name") == "family/seed1/hnet"
    adapt = stages["family/seed1/adaptation"]
    assert adapt.argv[0] == "predict" and _arg(adapt.argv, "--ckpt_path") == str(r / "hnet" / "best.ckpt")
    assert _arg(adapt.argv, "--stage_dir") == str(r / "adaptation")
    assert "--log_name" not in adapt.argv  # the adaptation dataset logs nothing
    for gen in ("hnet", "hvae"):
        ldm = stages[f"family/seed1/{gen}_hyperldm"]
        assert _arg(ldm.argv, "--model.init_args.upstream_ckpt") == str(r / gen / "best.ckpt")
        assert _arg(ldm.argv, "--model.init_args.hyperclip_ckpt") == str(r / f"{gen}_hyperclip" / "best.ckpt")
        assert _arg(ldm.argv, "--data.adaptation") == str(r / "adaptation")
        assert _arg(ldm.argv, "--model.init_args.classifier_scales") == "[1.0, 10.0]"  # from args.hyperldm
        assert set(ldm.deps) == {f"family/seed1/{d}" for d in (gen, "adaptation", f"{gen}_hyperclip")}
    # Conditional HNet-MAML: the hnet stage's YAML with condition: question, depending on nothing
    cond = stages["family/seed1/cond_hnet"]
    assert cond.kind == "cond_hnet" and cond.argv[:3] == hnet[:3] and cond.deps == []
    assert _arg(cond.argv, "--model.init_args.condition") == "question"
    assert _arg(cond.argv, "--stage_dir") == str(r / "cond_hnet") and "--test_after_fit" in cond.argv
    assert "--model.init_args.condition" not in hnet
    assert all("cond_hnet" not in d for s in stages.values() for d in s.deps)  # later stages: the plain hnet
    # per-stage arguments come after the kind's: the HVAE's guidance step in its own latent units
    assert _arg(stages["family/seed1/hvae_hyperclip"].argv, "--model.init_args.guidance_lr") == "0.3"
    assert _arg(stages["family/seed1/hvae_hyperclip"].argv, "--model.init_args.guidance_steps") == "200"
    assert "--model.init_args.guidance_lr" not in stages["family/seed1/hnet_hyperclip"].argv
    clip = stages["random/seed0/base/clip_zero_shot"]
    assert clip.argv[0] == "test" and not clip.resumable
    # every stage comes after the ones it depends on
    order = [s.name for s in plan(cfg)]
    assert all(order.index(d) < order.index(s.name) for s in plan(cfg) for d in s.deps)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("splits=[random,sideways]", "splits: 'sideways' is not one of"),
        ("generators=[hnet,gan]", "generators: 'gan'"),
        ("launcher=cluster", "launcher: 'cluster'"),
        ("colour=blue", "colour"),
        ("seeds=zero", "seeds"),
        ("args={hyperldm: [x], decoder: [y]}", "args: 'decoder'"),
    ],
)
def test_bad_pipeline_config_names_the_file_and_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert str(SMOKE) in str(e.value) and needle in str(e.value)


def test_stage_dir_places_the_outputs_wherever_the_checkpoint_callback_is(smoke_hnet, tmp_path):
    """--stage_dir finds the parts that write files by their kind, not by their place in the YAML."""
    from meta_vqa.lightning_cli import MetaVQACLI

    conf = tmp_path / "conf" / "smoke"
    conf.mkdir(parents=True)
    (conf.parent / "defaults.yaml").write_text((REPO / "conf" / "defaults.yaml").read_text())
    (conf / "defaults.yaml").write_text((REPO / "conf" / "smoke" / "defaults.yaml").read_text())
    config = conf / "hnet.yaml"  # an EMA after the checkpoint callback (which the defaults add)
    yaml = (REPO / "conf" / "smoke" / "hnet.yaml").read_text()
    config.write_text(
        yaml.replace("trainer:\n", "trainer:\n  callbacks:\n    - class_path: meta_vqa.callbacks.EMA\n", 1)
    )
    out = tmp_path / "stage"
    args = ["-c", str(config), "--data.root", str(smoke_hnet["root"]), "--stage_dir", str(out)]
    args += ["--log_dir", str(tmp_path / "logs"), "--log_name", "x/y", "--trainer.max_steps", "1"]
    cli = MetaVQACLI(args=args, run=False)  # no subcommand: parse and build, run nothing
    assert cli.trainer.checkpoint_callback.dirpath == str(out)
    assert cli.trainer.checkpoint_callback.filename == "best"
    assert cli.model.hparams.results_dir == str(out)
    assert cli.trainer.logger.save_dir == str(tmp_path / "logs") and cli.trainer.logger.name == "x/y"
    assert any(type(c).__name__ == "EMA" for c in cli.trainer.callbacks)


# --- the smoke chain, end to end -------------------------------------------------------------------------
def _pipeline(run: Path, data: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "meta_vqa",
        "pipeline",
        "-c",
        str(SMOKE),
        "--out",
        str(run),
        f"data.root={data}",
    ]
    return subprocess.Popen([*cmd, *extra], cwd=run.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def _stamp(run: Path, stage: str) -> dict | None:
    f = run / "random" / "seed0" / stage / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke pipeline killed (SIGKILL) while the HVAE trains, after its first last.ckpt; then re-run."""
    base = tmp_path_factory.mktemp("pipeline")
    run, data = base / "run", base / "data"
    t0 = time.time()
    proc = _pipeline(run, data)
    hvae = run / "random" / "seed0" / "hvae"
    while proc.poll() is None and not (hvae / "last.ckpt").is_file():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    first_out = proc.communicate()[0]
    assert not (hvae / "stage.json").exists(), "the HVAE finished before the kill; the test lost its point"
    killed = {s: _stamp(run, s) for s in ("hnet", "adaptation", "base/mnet_maml")}
    proc = _pipeline(run, data)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return {
        "run": run,
        "data": data,
        "killed": killed,
        "first": first_out,
        "out": out,
        "wall": time.time() - t0,
    }


@pytest.mark.slow
def test_killed_pipeline_resumes_without_redoing_finished_stages(smoke_run):
    run, killed = smoke_run["run"], smoke_run["killed"]
    assert all(killed.values()), "hnet, adaptation and the base variants had finished before the kill"
    summary = {s["stage"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    for stage in ("hnet", "adaptation", "base/mnet_maml", "base/clip_zero_shot"):
        assert summary[f"random/seed0/{stage}"]["status"] == "skipped"
    for stage, rec in killed.items():  # the very same finished runs, not repeated
        assert _stamp(run, stage)["run_id"] == rec["run_id"]
    assert summary["random/seed0/hvae"]["status"] == "resumed"  # from its last.ckpt
    assert "--ckpt_path" in _stamp(run, "hvae")["argv"]
    hvae = run / "random" / "seed0" / "hvae"
    assert (hvae / "best.ckpt").is_file() and not (hvae / "last.ckpt").exists()  # finished: no resume point
    for stage in ("hvae", "hnet_hyperclip", "hvae_hyperclip", "hnet_hyperldm", "hvae_hyperldm"):
        assert _stamp(run, stage) is not None
    assert "up to date, skipped" in smoke_run["out"]


@pytest.mark.slow
def test_smoke_pipeline_report(smoke_run):
    run = smoke_run["run"]
    report = run / "report"
    records = json.loads((report / "results.json").read_text())
    methods = {r["method"] for r in records}
    expected = {"chance", "majority", "clip_zero_shot", "uncond_multitask", "cond_multitask",
                "cond_multitask_film", "mnet_maml", "hnet_maml", "cond_hnet_maml", "hvae", "hnet_hyperclip", "hvae_hyperclip",
                "hnet_hyperldm", "hvae_hyperldm", "hnet_combined", "hvae_combined"}  # fmt: skip
    assert expected <= methods
    shots = {r["shots"] for r in records if r["method"] == "hnet_hyperldm"}
    assert shots == {0, 1, 2, 3, "full"}  # conf/smoke: max_shots 3
    controls = {r.get("control") for r in records if r["method"] == "hnet_hyperldm" and r["shots"] == 0}
    assert controls == {"aligned", "shuffled", "empty"}
    md = (report / "results.md").read_text()
    for heading in ("## split: random", "## What this run shows", "## Memorisation", "## Plots"):
        assert heading in md
    for png in (
        "accuracy_vs_gamma",
        "kshot",
        "latents_hnet_hyperldm_random",
        "latents_hvae_hyperclip_random",
    ):
        assert (report / f"{png}.png").stat().st_size > 1000
    assert list((run / "lightning_logs" / "report").glob("events.out.tfevents.*"))
    assert list((run / "lightning_logs" / "random" / "seed0" / "hnet").rglob("events.out.tfevents.*"))
    mem = json.loads((report / "memorisation.json").read_text())
    assert {m["method"] for m in mem} == {
        "hnet_hyperclip",
        "hvae_hyperclip",
        "hnet_hyperldm",
        "hvae_hyperldm",
    }
    n_test = len(json.loads((smoke_run["data"] / "meta_test.json").read_text()))
    assert all(m["generated_to_train"] > 0 and m["n_generated"] == n_test for m in mem)
    # guided zero-shot above chance
    zs = lambda m: next(r["accuracy"] for r in records if r["method"] == m and r["shots"] == 0
                        and r.get("control", "aligned") == "aligned" and r.get("gamma") in (None, 1.0))  # fmt: skip
    assert zs("hnet_hyperldm") > zs("chance") + 5
    # HyperCLIP's test summary sets the validation retrieval its best checkpoint was saved after beside the test one
    import torch

    for stage in ("hnet_hyperclip", "hvae_hyperclip"):
        folder = run / "random" / "seed0" / stage
        diag = json.loads((folder / "diagnostics.json").read_text())
        saved = torch.load(folder / "best.ckpt", weights_only=True, map_location="cpu")["val_retrieval_acc"]
        assert diag["val_retrieval_acc"] == pytest.approx(saved) and 0 <= saved <= 100


@pytest.mark.slow
def test_changed_stage_config_reruns_only_that_stage_and_downstream(smoke_run, tmp_path):
    run, data = smoke_run["run"], smoke_run["data"]
    before = {
        s: _stamp(run, s)["run_id"] for s in ("hnet", "hnet_hyperldm", "hvae_hyperldm", "hnet_hyperclip")
    }
    proc = _pipeline(run, data, "args.hyperldm=[--trainer.max_steps,60]")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    summary = {s["stage"]: s["status"] for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    reran = {s for s, st in summary.items() if st != "skipped" and s not in ("prepare", "report")}
    assert reran == {"random/seed0/hnet_hyperldm", "random/seed0/hvae_hyperldm"}
    assert _stamp(run, "hnet")["run_id"] == before["hnet"]
    assert _stamp(run, "hnet_hyperclip")["run_id"] == before["hnet_hyperclip"]
    assert _stamp(run, "hnet_hyperldm")["run_id"] != before["hnet_hyperldm"]
    stale = sorted(p.name for p in (run / "_stale").iterdir())  # the old results are kept, not deleted
    assert len(stale) == 2 and all((run / "_stale" / s / "stage.json").is_file() for s in stale)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plan_rows(out: str) -> dict[str, str]:
    """The numbered lines of a plan by step name."""
    return {ln.split()[1]: ln.strip() for ln in out.splitlines() if re.fullmatch(r"\d+\.", ln.split()[0])}


def test_dry_run_is_a_numbered_plan_with_each_stage_status(tmp_path, capsys):
    from meta_vqa.pipeline import RUNNING, STAMP, stage_hash

    run, data = tmp_path / "run", tmp_path / "data"
    over = [f"out={run}", f"data.root={data}", "base_variants=[clip_zero_shot,mnet_maml]"]
    cfg = load_config(SMOKE, [*over, "generators=[hnet]", "guidance=[hyperclip]", "cond_hnet=false"])
    # a fresh run: nothing built, every stage to run, prepare and report included
    assert Pipeline(cfg, source="conf/smoke/pipeline.yaml").run(dry_run=True) == []
    out = capsys.readouterr().out
    assert out.startswith(f"meta-vqa pipeline: conf/smoke/pipeline.yaml → {run}")
    assert "7 steps: prepare, 5 stages (random split, seed 0: 5 to run), report" in out
    rows = _plan_rows(out)
    assert rows["prepare"].startswith("1. prepare ") and "to build" in rows["prepare"]
    assert rows["report"].startswith("7. report ") and rows["report"].endswith(f"meta-vqa report {run}")
    assert all("to run" in rows[s.name] for s in plan(cfg))
    assert not run.exists() and not data.exists()

    # a run folder as a killed run leaves it: one stage done, one stale, one interrupted with a resume point
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    pipe = Pipeline(cfg)
    digest = pipe.data_digest()
    st = {s.name.split("/", 2)[2]: s for s in pipe.stages}
    h = lambda name: stage_hash(st[name], {}, digest)
    write = lambda name, file, rec: (st[name].dir.mkdir(parents=True, exist_ok=True),
                                     (st[name].dir / file).write_text(json.dumps(rec)))  # fmt: skip
    write("base/clip_zero_shot", STAMP, {"hash": h("base/clip_zero_shot"), "run_id": "a"})
    write("base/mnet_maml", STAMP, {"hash": "an older config", "run_id": "b"})
    write("hnet", RUNNING, {"hash": h("hnet")})
    (st["hnet"].dir / "last.ckpt").write_bytes(b"")
    write("hnet_hyperclip", STAMP, {"hash": "made from an older hnet", "run_id": "c"})
    before = _files(tmp_path)
    assert Pipeline(cfg, verbose=True).run(dry_run=True) == []
    out = capsys.readouterr().out
    assert _files(tmp_path) == before  # a plan writes nothing
    rows = _plan_rows(out)
    assert list(rows) == ["prepare", *(s.name for s in pipe.stages), "report"]
    assert rows["prepare"].startswith("1. ") and "built: check, reuse" in rows["prepare"]
    assert "done: skip" in rows["random/seed0/base/clip_zero_shot"]
    assert "stale: re-run" in rows["random/seed0/base/mnet_maml"]
    assert "resume from last.ckpt" in rows["random/seed0/hnet"]
    assert "to run" in rows["random/seed0/adaptation"]  # after the hnet it waits for
    assert "stale: re-run" in rows["random/seed0/hnet_hyperclip"]  # its hnet runs again
    assert "(random split, seed 0: 1 done, 2 stale, 1 to resume, 1 to run)" in out
    # short commands name the config and what differs between stages; --verbose adds the whole command
    short = rows["random/seed0/base/mnet_maml"]
    assert short.endswith(
        "meta-vqa fit -c " + str(REPO / "conf/smoke/base.yaml") + " --model.init_args.variant mnet_maml …"
    )
    assert "--stage_dir" not in short
    assert sum(ln.strip().startswith("meta-vqa ") and "--stage_dir" in ln for ln in out.splitlines()) == 5


def test_cond_hnet_takes_the_hnet_arguments_then_its_own(tmp_path, capsys):
    short = REPO / "conf" / "meta_vqa" / "pipeline_short.yaml"
    cfg = load_config(short, [f"out={tmp_path}", "args.cond_hnet=[--trainer.max_steps,7]"])
    stages = {s.name: s for s in plan(cfg)}
    hnet, cond = stages["random/seed0/hnet"].argv, stages["random/seed0/cond_hnet"].argv
    assert cond[cond.index("--trainer.max_steps") :] == [
        *hnet[hnet.index("--trainer.max_steps") :],
        "--trainer.max_steps",
        "7",
    ]
    assert Pipeline(load_config(SMOKE, [f"out={tmp_path}"]), only=["cond_hnet"]).run(dry_run=True) == []
    rows = _plan_rows(capsys.readouterr().out)
    lines = [row for name, row in rows.items() if name not in ("prepare", "report")]
    assert (
        len(lines) == 1
        and "smoke/hnet.yaml" in lines[0]
        and "--model.init_args.condition question" in lines[0]
    )
    assert not any(
        s.kind == "cond_hnet" for s in plan(load_config(SMOKE, [f"out={tmp_path}", "cond_hnet=false"]))
    )


def test_display_arguments_do_not_make_a_stage_stale(tmp_path):
    from meta_vqa.pipeline import stage_hash

    cfg = load_config(SMOKE, [f"out={tmp_path}"])
    quiet = plan(load_config(SMOKE, [f"out={tmp_path}", "progress_bar=false"]))[1]
    shown = plan(cfg)[1]
    assert quiet.argv != shown.argv and stage_hash(quiet, {}, "d") == stage_hash(shown, {}, "d")


def test_the_packed_output_layer_leaves_the_hash_alone(tmp_path, monkeypatch):
    """META_VQA_PACKED_LINEAR picks a kernel that gives the same bits (tests/test_packed.py), so on, off or
    unset, a stage has the hash of its command, configs, data and upstream runs alone."""
    import hashlib

    from meta_vqa.lightning_cli import default_files
    from meta_vqa.pipeline import DISPLAY_ARGS, _without, stage_hash

    st = plan(load_config(SMOKE, [f"out={tmp_path}"]))[1]
    by_hand = hashlib.sha256(
        json.dumps([_without(st.argv, DISPLAY_ARGS), {"hnet": "r1"}, "d"], sort_keys=True).encode()
    )
    for path in [*default_files(st.config), st.config]:
        by_hand.update(path.read_bytes())
    monkeypatch.delenv("META_VQA_PACKED_LINEAR", raising=False)
    assert stage_hash(st, {"hnet": "r1"}, "d") == by_hand.hexdigest()
    for value in ("0", "off", "1"):
        monkeypatch.setenv("META_VQA_PACKED_LINEAR", value)
        assert stage_hash(st, {"hnet": "r1"}, "d") == by_hand.hexdigest()


@pytest.mark.slow
def test_process_launcher_runs_each_stage_in_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    over = [f"out={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "launcher=process"]
    cfg = load_config(SMOKE, [*over, "base_variants=[clip_zero_shot]", "report=false"])
    summary = Pipeline(cfg, only=["base"]).run()
    assert [s["status"] for s in summary] == ["ran", "ran"]  # prepare, then the one base stage
    assert (tmp_path / "data" / "dataset.json").is_file()
    records = json.loads(
        (tmp_path / "run" / "random" / "seed0" / "base" / "clip_zero_shot" / "results.json").read_text()
    )
    assert {r["method"] for r in records} >= {"clip_zero_shot", "chance"}


def test_footer_counts_stages_and_shows_the_next_steps(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "clip").mkdir(parents=True)
    # the task-file format the builders write (answers listed beside the image/answer pairs)
    tasks = {
        "is there a red shape?": {
            "train": [["i1", "yes"], ["i2", "no"]],
            "test": [["i3", "yes"]],
            "answers": ["yes", "no"],
        }
    }
    (data / "meta_test.json").write_text(json.dumps(tasks))
    pipe = Pipeline(load_config(SMOKE, [f"out={run}", f"data.root={data}"]))
    pipe.summary = [
        {"stage": "prepare", "status": "ran", "wall_s": 1.0},
        {"stage": "random/seed0/hnet", "status": "skipped", "wall_s": 0.0},
        {"stage": "random/seed0/adaptation", "status": "resumed", "wall_s": 2.0},
        {"stage": "random/seed0/hvae", "status": "ran", "wall_s": 3.0},
        {"stage": "report", "status": "ran", "wall_s": 1.0},
    ]
    footer = pipe._footer(75.0).splitlines()
    assert footer[0] == "pipeline done in 1:15: 2 stages run, 1 skipped (and prepare and report)"
    assert f"tensorboard --logdir {run / 'lightning_logs'}" in footer[1]
    assert footer[2].endswith(
        f"meta-vqa generate --run {run} --question 'is there a red shape?' --answers no,yes"
    )
    assert footer[3].endswith(str(run / "pipeline.json"))
