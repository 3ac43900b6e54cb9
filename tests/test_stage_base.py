"""Base-model stage end to end through the CLI on the synthetic dataset (tiny config)."""

import json
from pathlib import Path

import pytest
import torch

from meta_vqa.cli import main
from meta_vqa.stages.base import BaseStage

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "conf" / "smoke" / "base.yaml")


def _fit_test(tmp_path, root, variant, *extra):
    out = tmp_path / "res" / variant
    verb = "test" if variant == "clip_zero_shot" else "fit"
    args = [
        verb,
        "-c",
        SMOKE,
        "--data.root",
        str(root),
        "--model.init_args.variant",
        variant,
        "--model.init_args.results_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    if verb == "fit":
        args += ["--test_after_fit", "true"]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def _acc(records, method, shots):
    return next(r["accuracy"] for r in records if r["method"] == method and r["shots"] == shots)


@pytest.fixture(scope="module")
def all_variants(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    import os

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        out = {}
        for v in ("clip_zero_shot", "uncond_multitask", "cond_multitask", "cond_multitask_film", "mnet_maml"):
            out[v] = _fit_test(tmp, synthetic_root, v)
        return out
    finally:
        os.chdir(cwd)


def test_every_variant_writes_the_results_contract(all_variants):
    for variant, records in all_variants.items():
        methods = {r["method"] for r in records}
        assert methods == {variant, "chance", "majority"}
        for r in records:
            assert set(r) == {"method", "split", "shots", "seed", "accuracy", "accuracy_pooled", "n_tasks"}
            assert r["split"] == "random" and r["seed"] == 0 and 0 <= r["accuracy"] <= 100
        shots = {r["shots"] for r in records if r["method"] == variant}
        assert shots == {0, "full", 1, 2, 3}


def test_trained_variants_beat_chance_and_use_the_question(all_variants):
    chance = _acc(all_variants["mnet_maml"], "chance", 0)
    for variant, records in all_variants.items():
        assert _acc(records, variant, "full") > chance + 10, variant
    # half the synthetic tasks are "negated": only a model that reads the question can get them zero-shot
    assert (
        _acc(all_variants["cond_multitask"], "cond_multitask", 0)
        > _acc(all_variants["uncond_multitask"], "uncond_multitask", 0) + 5
    )
    # few-shot adaptation helps a model that does not see the question
    assert _acc(all_variants["mnet_maml"], "mnet_maml", "full") > _acc(
        all_variants["mnet_maml"], "mnet_maml", 0
    )


def test_checkpoint_reload_gives_identical_predictions(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "fit",
                "-c",
                SMOKE,
                "--data.root",
                str(synthetic_root),
                "--model.init_args.variant",
                "cond_multitask",
                "--trainer.max_steps",
                "6",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        == 0
    )
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    model = BaseStage.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    again = BaseStage.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    q = torch.randn(3, model.hparams.question_dim)
    torch.testing.assert_close(model.hnet(q), again.hnet(q))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6


def test_resume_from_last_checkpoint_continues_the_step_count(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [
        "-c",
        SMOKE,
        "--data.root",
        str(synthetic_root),
        "--model.init_args.variant",
        "mnet_maml",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(["fit", *base, "--trainer.max_steps", "4"]) == 0
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    assert main(["fit", *base, "--trainer.max_steps", "8", "--ckpt_path", str(ckpt)]) == 0
    lasts = sorted((tmp_path / "lightning_logs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(lasts[-1], map_location="cpu", weights_only=True)["global_step"] == 8


def test_ddp_spawn_test_matches_a_single_process(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [
        "test",
        "-c",
        SMOKE,
        "--data.root",
        str(synthetic_root),
        "--model.init_args.variant",
        "clip_zero_shot",
        "--trainer.enable_progress_bar",
        "false",
        "--data.eval_batch_size",
        "2",
    ]
    assert main([*common, "--model.init_args.results_dir", str(tmp_path / "one")]) == 0
    assert (
        main(
            [
                *common,
                "--model.init_args.results_dir",
                str(tmp_path / "two"),
                "--trainer.strategy",
                "ddp_spawn",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "2",
            ]
        )
        == 0
    )
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["n_tasks"] == b["n_tasks"] and abs(a["accuracy"] - b["accuracy"]) < 1e-6, (a, b)


def test_command_line_model_arguments_win_over_the_checkpoint(synthetic_root, tmp_path, monkeypatch):
    # `test --ckpt_path X` takes the model's hyperparameters from X, except those typed on the command line
    monkeypatch.chdir(tmp_path)
    base = ["-c", SMOKE, "--data.root", str(synthetic_root), "--trainer.enable_progress_bar", "false"]
    first = tmp_path / "first"
    fit = ["fit", *base, "--model.init_args.variant", "mnet_maml", "--trainer.max_steps", "4"]
    assert main([*fit, "--model.init_args.results_dir", str(first)]) == 0
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    second = tmp_path / "second"
    args = ["test", *base, "--ckpt_path", str(ckpt), "--model.init_args.results_dir", str(second)]
    assert main([*args, "--model.init_args.max_shots", "1"]) == 0
    records = json.loads((second / "results.json").read_text())
    assert {r["shots"] for r in records if r["method"] == "mnet_maml"} == {0, "full", 1}
    assert not (first / "results.json").exists()  # fit without --test_after_fit wrote nothing there
