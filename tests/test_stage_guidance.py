"""HyperCLIP and HyperLDM through the CLI on the synthetic chain (tiny configs), plus their pieces."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from meta_vqa.cli import main
from meta_vqa.data.batch import TaskBatch
from meta_vqa.diffusion.guidance import optimize_latents
from meta_vqa.stages.guidance import control_questions
from meta_vqa.stages.hyperldm import HyperLDMStage

REPO = Path(__file__).resolve().parents[1]
ADAPT = str(REPO / "conf" / "smoke" / "adapt.yaml")
HYPERCLIP = str(REPO / "conf" / "smoke" / "hyperclip.yaml")
HYPERLDM = str(REPO / "conf" / "smoke" / "hyperldm.yaml")


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def _acc(records, method, shots=0, **extra):
    rows = [
        r
        for r in records
        if r["method"] == method and r["shots"] == shots and all(r.get(k) == v for k, v in extra.items())
    ]
    assert len(rows) == 1, (method, shots, extra, rows)
    return rows[0]["accuracy"]


@pytest.fixture(scope="module")
def guided(smoke_hnet, tmp_path_factory):
    """hnet (session fixture) → adaptation dataset → HyperCLIP → HyperLDM with combined guidance."""
    work = tmp_path_factory.mktemp("guided")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        root, hnet = str(smoke_hnet["root"]), work / "hnet.ckpt"
        shutil.copy(smoke_hnet["ckpt"], hnet)
        common = ["--data.root", root, "--trainer.enable_progress_bar", "false"]
        assert (
            main(
                [
                    "predict",
                    "-c",
                    ADAPT,
                    "--ckpt_path",
                    str(hnet),
                    *common[:2],
                    "--stage_dir",
                    str(work / "adaptation"),
                ]
            )
            == 0
        )
        up = ["--model.init_args.upstream_ckpt", str(hnet), "--data.adaptation", str(work / "adaptation")]
        assert (
            main(
                [
                    "fit",
                    "-c",
                    HYPERCLIP,
                    *common,
                    *up,
                    "--test_after_fit",
                    "true",
                    "--model.init_args.results_dir",
                    str(work / "hyperclip"),
                ]
            )
            == 0
        )
        clip_ckpt = next((work / "lightning_logs" / "hyperclip").rglob("best.ckpt"))
        assert (
            main(
                [
                    "fit",
                    "-c",
                    HYPERLDM,
                    *common,
                    *up,
                    "--test_after_fit",
                    "true",
                    "--model.init_args.hyperclip_ckpt",
                    str(clip_ckpt),
                    "--model.init_args.classifier_scales",
                    "[0.0, 2.0]",
                    "--model.init_args.results_dir",
                    str(work / "hyperldm"),
                ]
            )
            == 0
        )
        ldm_ckpt = next((work / "lightning_logs" / "hyperldm").rglob("best.ckpt"))
    finally:
        os.chdir(cwd)
    return {
        "work": work,
        "root": root,
        "hnet": hnet,
        "clip_ckpt": clip_ckpt,
        "ldm_ckpt": ldm_ckpt,
        "hyperclip": _records(work / "hyperclip"),
        "hyperldm": _records(work / "hyperldm"),
    }


def test_hyperclip_records_controls_and_beats_chance(guided):
    recs = guided["hyperclip"]
    chance = _acc(recs, "chance")
    assert {r["control"] for r in recs if r["method"] == "hnet_hyperclip"} == {"aligned", "shuffled", "empty"}
    assert _acc(recs, "hnet_hyperclip", control="aligned") > chance + 10
    assert _acc(recs, "hnet_hyperclip", "full", control="aligned") > chance + 10
    # the description matters: another task's question guides worse than the task's own
    assert _acc(recs, "hnet_hyperclip", control="aligned") > _acc(recs, "hnet_hyperclip", control="shuffled")


def test_hyperldm_sweeps_gamma_and_combined_scale_zero_is_plain_cfg(guided):
    recs = guided["hyperldm"]
    gammas = {r["gamma"] for r in recs if r["method"] == "hnet_hyperldm" and r["control"] == "aligned"}
    assert gammas == {0.0, 1.0, 2.0}
    for shots in (0, "full"):
        assert _acc(recs, "hnet_combined", shots, gamma=1.0, classifier_scale=0.0) == _acc(
            recs, "hnet_hyperldm", shots, gamma=1.0, control="aligned"
        )
    # the empty description is the null condition, which γ = 0 samples too (same noise)
    assert _acc(recs, "hnet_hyperldm", gamma=1.0, control="empty") == _acc(
        recs, "hnet_hyperldm", gamma=0.0, control="aligned"
    )
    for r in recs:
        assert 0 <= r["accuracy"] <= 100 and r["n_tasks"] > 0


def test_hyperldm_checkpoint_is_self_contained(guided, tmp_path):
    """Restoring needs neither the generator's nor the HyperCLIP's file, and samples identically."""
    ckpt = tmp_path / "ldm.ckpt"
    shutil.copy(guided["ldm_ckpt"], ckpt)
    model = HyperLDMStage.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    q = torch.randn(3, model.hparams.question_dim)
    a = model.sample_latents(q, 2.0, seed=5, sampler="ddim", steps=10, classifier_scale=1.0)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (guided["hnet"], guided["clip_ckpt"]):
        shutil.move(str(f), moved / Path(f).name)
    try:
        again = HyperLDMStage.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        b = again.sample_latents(q, 2.0, seed=5, sampler="ddim", steps=10, classifier_scale=1.0)
    finally:
        for f in (guided["hnet"], guided["clip_ckpt"]):
            shutil.move(str(moved / Path(f).name), f)
    assert torch.equal(a, b)
    assert bool(again.stats_ready) and again.latent_std.min() > 0


def test_latent_statistics_are_those_of_the_adaptation_latents(guided):
    from meta_vqa.data.latents import AdaptationData

    model = HyperLDMStage.load_from_checkpoint(guided["ldm_ckpt"], map_location="cpu", weights_only=True)
    lat = AdaptationData.load(guided["work"] / "adaptation").tensors["latents"].flatten(0, 1)
    torch.testing.assert_close(model.latent_mean, lat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.latent_std, lat.std(0), rtol=1e-5, atol=1e-5)


def test_classifier_free_training_drops_about_p_of_the_conditions(guided, monkeypatch):
    model = HyperLDMStage.load_from_checkpoint(guided["ldm_ckpt"], map_location="cpu", weights_only=True)
    seen = []
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    original = model.denoiser.forward
    monkeypatch.setattr(model.denoiser, "forward", lambda x, t, c: seen.append(c) or original(x, t, c))
    from meta_vqa.data.latents import LatentBatch

    torch.manual_seed(0)
    d = model.generator.latent_dim
    for _ in range(50):
        q = torch.randn(40, model.hparams.question_dim) + 3
        model.training_step(LatentBatch(torch.randn(40, d), torch.arange(40), q, 0), 0)
    nulls = torch.cat([(c == 0).all(-1) for c in seen]).float().mean().item()
    assert abs(nulls - 0.2) < 0.03  # Bernoulli(0.2), not a fixed count per batch


def _batch(B=4, dq=3):
    z = torch.zeros(B, 1)
    return TaskBatch(
        task=torch.arange(B),
        question=torch.arange(B * dq, dtype=torch.float).view(B, dq),
        answers=z,
        answer_mask=z.bool(),
        support_x=z,
        support_y=z.long(),
        support_mask=z.bool(),
        query_x=z,
        query_y=z.long(),
        query_mask=z.bool(),
    )


def test_control_descriptions():
    b = _batch()
    assert torch.equal(control_questions(b, "aligned"), b.question)
    assert torch.equal(control_questions(b, "shuffled")[1], b.question[0])
    assert not (control_questions(b, "shuffled") == b.question).all(-1).any()
    assert (control_questions(b, "empty") == 0).all()


def test_guidance_by_optimisation_is_independent_per_task():
    target = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    score = lambda z: -((z - target) ** 2).sum(-1)  # noqa: E731
    z = optimize_latents(torch.zeros(2, 2), score, steps=400, lr=0.05)
    torch.testing.assert_close(z, target, rtol=0, atol=0.05)
    one = optimize_latents(torch.zeros(1, 2), lambda z: -((z - target[1:]) ** 2).sum(-1), steps=37, lr=0.05)
    both = optimize_latents(torch.zeros(2, 2), score, steps=37, lr=0.05)
    torch.testing.assert_close(both[1:], one)  # batching tasks changes nothing
    # the prior term keeps the latent near its start
    held = optimize_latents(torch.zeros(2, 2), score, steps=400, lr=0.05, prior_weight=10.0)
    assert (held.norm(dim=-1) < z.norm(dim=-1)).all()


def test_bench_sample_reports_ratios_and_accuracies(guided, capsys):
    args = [
        "bench",
        "sample",
        "--json",
        "--ckpt",
        str(guided["ldm_ckpt"]),
        "--data-root",
        str(guided["root"]),
    ]
    assert main([*args, "--ddim-steps", "10", "--dpm-steps", "5", "--repeats", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_name = {r["figure"]: r for r in rows}
    assert set(by_name) == {
        "ddim10_wall_time",
        "ddim10_zero_shot_accuracy",
        "dpm5_wall_time",
        "dpm5_zero_shot_accuracy",
    }
    for r in rows:
        assert set(r) == {"bench", "figure", "value", "unit", "baseline_value", "ratio", "device", "config"}
        assert r["bench"] == "sample" and r["config"]["baseline"] == "ddpm-1000"
    t = by_name["ddim10_wall_time"]
    assert t["unit"] == "s" and t["ratio"] == pytest.approx(t["baseline_value"] / t["value"])
    acc = by_name["dpm5_zero_shot_accuracy"]
    assert acc["ratio"] is None and 0 <= acc["value"] <= 100 and 0 <= acc["baseline_value"] <= 100


class _FakeClip(torch.nn.Module):
    """A stand-in for the dataset's CLIP on the synthetic data: fixed random text/image features."""

    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(64, dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def encode_text(self, tokens):
        return self.proj(torch.nn.functional.one_hot(tokens % 64, 64).float().mean(1))

    def encode_image(self, x):
        return self.proj(x.flatten(1)[:, :64])


def _fake_clip(dim):
    from types import SimpleNamespace

    model = _FakeClip(dim)
    tokenizer = lambda texts: torch.tensor(
        [[hash(w) % 997 for w in (t.split() + ["<pad>"] * 8)[:8]] for t in texts]
    )
    config = SimpleNamespace(image_size=8, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    return SimpleNamespace(model=model, tokenizer=tokenizer, config=config)


def test_generate_writes_weights_with_metadata_and_answers_images(guided, tmp_path, monkeypatch, capsys):
    clip_dir = Path(guided["root"]) / "clip"  # generate looks for the dataset's CLIP folder
    created = not clip_dir.exists()
    clip_dir.mkdir(exist_ok=True)
    try:
        _generate(images_dir=tmp_path, monkeypatch=monkeypatch, capsys=capsys, guided=guided)
    finally:
        if created:
            clip_dir.rmdir()


def _generate(images_dir, monkeypatch, capsys, guided):
    from PIL import Image
    from safetensors import safe_open

    import meta_vqa.nets.clip as clip_module

    tmp_path = images_dir
    monkeypatch.setattr(clip_module, "load_clip", lambda r: _fake_clip(32))
    images = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), color).save(images[-1])
    out = tmp_path / "gen" / "w.safetensors"
    args = ["generate", "--ckpt", str(guided["ldm_ckpt"]), "--question", "is it red?", "--answers", "yes,no"]
    args += ["--prompt", "it is {}", "--out", str(out), "--image", *map(str, images)]
    assert main([*args, "--method", "combined", "--samples", "4", "--rerank", "hyperclip"]) == 0
    printed = capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta, w = f.metadata(), f.get_tensor("weights")
    model = HyperLDMStage.load_from_checkpoint(guided["ldm_ckpt"], map_location="cpu", weights_only=True)
    assert w.shape == (model.generator.adapter.num_params,) and torch.isfinite(w).all()
    assert (
        meta["question"] == "is it red?" and meta["answers"] == "yes,no" and meta["method"] == "hnet_combined"
    )
    assert meta["gamma"] == str(model.hparams.gamma) and meta["answer_template"] == "it is {}"
    for img in images:
        line = next(x for x in printed.splitlines() if x.startswith(str(img)))
        probs = [float(v.rstrip("%")) for v in re.findall(r"[\d.]+%", line)]
        assert len(probs) == 2 and abs(sum(probs) - 100) < 0.2
    # bad input: one error line, exit 2
    assert main([*args[:-3], "--answers", "yes"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path), "--question", "q", "--answers", "a,b"]) == 2
    assert "hnet_hyperldm/best.ckpt" in capsys.readouterr().err


def test_generate_works_from_any_folder_on_a_run(guided, tmp_path, monkeypatch, capsys):
    """The pipeline records the dataset folder relative to where it ran: generate finds it from another
    folder (under a parent of the run, or from pipeline.json's absolute path), or takes --data-root."""
    from PIL import Image

    import meta_vqa.nets.clip as clip_module

    monkeypatch.setattr(clip_module, "load_clip", lambda r: _fake_clip(32))
    repo = tmp_path / "repo"
    (repo / "data" / "synthetic" / "clip").mkdir(parents=True)
    run = repo / "runs" / "smoke"
    stage = run / "random" / "seed0" / "hnet_hyperldm"
    stage.mkdir(parents=True)
    ckpt = torch.load(guided["ldm_ckpt"], map_location="cpu", weights_only=True)
    ckpt["datamodule_hyper_parameters"]["root"] = "data/synthetic"  # as recorded by `make run`
    torch.save(ckpt, stage / "best.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    Image.new("RGB", (8, 8), (255, 0, 0)).save("red.png")
    args = ["generate", "--run", str(run), "--question", "is it red?", "--answers", "yes,no"]
    args += ["--out", "w.safetensors", "--image", "red.png"]
    # 1. the recorded folder under a parent of the run (a run inside the repository)
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hnet_hyperldm weights for 'is it red?'") and out[0].endswith("-> w.safetensors")
    assert out[1].startswith("answer template: ")
    assert re.fullmatch(r"red\.png: (yes|no) ([<>]?\d+\.\d%), (yes|no) ([<>]?\d+\.\d%)", out[2])
    # 2. the dataset moved out of the repository: pipeline.json's absolute data_root
    moved = tmp_path / "datasets" / "synthetic"
    moved.parent.mkdir()
    (repo / "data" / "synthetic").rename(moved)
    assert main(args) == 2 and "--data-root" in capsys.readouterr().err
    (run / "pipeline.json").write_text(json.dumps({"data_root": str(moved)}))
    assert main([*args, "--prompt", "it is {}"]) == 0
    assert "answer template: 'it is {}' (--prompt)" in capsys.readouterr().out
    # 3. --data-root wins, and must hold a CLIP
    (run / "pipeline.json").unlink()
    assert main([*args, "--data-root", str(moved)]) == 0
    assert main([*args, "--data-root", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_probabilities_are_printed_readably():
    from meta_vqa.generate import percent

    assert [percent(p) for p in (0.0, 0.0004, 0.0006, 0.4234, 0.9994, 0.9996, 1.0)] == [
        "<0.1%", "<0.1%", "0.1%", "42.3%", "99.9%", ">99.9%", ">99.9%"
    ]  # fmt: skip


HNET_RECORD = {
    "class_path": "meta_vqa.stages.hnet.HNetStage",
    "hparams": {
        "feature_dim": 6,
        "question_dim": 5,
        "adapter_hidden": 3,
        "latent_dim": 4,
        "hnet_hidden": [8, 8],
    },
}


def _tiny_hyperclip(generator: str = "hnet", **kw):
    """A HyperCLIP stage on a random tiny generator (double precision); ``hvae``: with standardisation."""
    from meta_vqa.stages.hyperclip import HyperCLIPStage

    torch.manual_seed(0)
    record = HNET_RECORD
    if generator == "hvae":
        hp = {"upstream": HNET_RECORD, "feature_dim": 6, "question_dim": 5, "latent_dim": 4, "hidden": [8]}
        record = {"class_path": "meta_vqa.stages.hvae.HVAEStage", "hparams": {**hp, "normalize": True}}
    kw = {"guidance_steps": 7, "guidance_lr": 0.05, **kw}
    stage = HyperCLIPStage(upstream=record, feature_dim=6, question_dim=5, hidden=(8, 8), **kw).double()
    if generator == "hvae":
        stage.generator.w_scale.fill_(0.7)
        stage.generator.w_mean.normal_()
    return stage


@pytest.mark.parametrize("generator", ["hnet", "hvae"])
def test_folded_latent_encoder_equals_encoder_of_generated_weights(generator):
    """G's output layer folded into H_ω's first layer: the same embeddings and latent gradients."""
    stage = _tiny_hyperclip(generator)
    gen = stage.generator
    features, a, b = gen.weight_map()
    z = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(features(z) @ a.T + b, gen.weights(z))
    folded, plain = stage.latent_encoder()(z), stage.encoder(gen.weights(z))
    torch.testing.assert_close(folded, plain)
    q = torch.randn(3, 5, dtype=torch.double)
    (g1,) = torch.autograd.grad((folded * q).sum(), z)
    (g2,) = torch.autograd.grad((plain * q).sum(), z)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("langevin", [0.0, 0.1])
def test_guided_controls_equal_one_unfolded_run_per_control(langevin):
    """The three controls stacked in one optimisation equal the previous path: one unfolded run per
    control (and, without Langevin noise, per task)."""
    stage = _tiny_hyperclip(langevin=langevin)
    gen, hp = stage.generator, stage.hparams
    batch = _batch(B=3, dq=5)
    batch.question = torch.randn(3, 5, dtype=torch.double)
    got = stage.guided_controls(batch)
    assert list(got) == ["aligned", "shuffled", "empty"]
    for control, z in got.items():
        q = control_questions(batch, control)
        rows = [slice(b, b + 1) for b in range(len(batch))] if not langevin else [slice(0, len(batch))]
        for r in rows:
            noise = torch.Generator().manual_seed(hp.eval_seed) if langevin else None
            ref = optimize_latents(
                gen.init_latents(batch.task[r]).detach(),
                lambda z, q=q[r]: stage.similarity(gen.weights(z), q),
                hp.guidance_steps,
                hp.guidance_lr,
                langevin=langevin,
                generator=noise,
            )
            torch.testing.assert_close(z[r], ref, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got["aligned"], got["empty"])
    if not langevin:  # no description, no noise: the start latent
        assert torch.equal(got["empty"], gen.init_latents(batch.task).detach().expand(3, -1))


def test_retrieval_scores_latents_made_like_the_training_latents():
    """HyperCLIP's retrieval diagnostic on an HVAE scores draws of q(z | G_θ(z_τ)) for HNet support-adapted
    latents z_τ, the distribution the encoder was trained on, not the HVAE start latent after the HVAE's own
    few-shot loop (issue 15: at the paper's step size that loop leaves every task at the start)."""
    g = torch.Generator().manual_seed(0)
    B, S, K = 3, 5, 2
    batch = TaskBatch(
        task=torch.arange(B),
        question=torch.randn(B, 5, generator=g, dtype=torch.double),
        answers=torch.randn(B, K, 6, generator=g, dtype=torch.double),
        answer_mask=torch.ones(B, K, dtype=torch.bool),
        support_x=torch.randn(B, S, 6, generator=g, dtype=torch.double),
        support_y=torch.randint(0, K, (B, S), generator=g),
        support_mask=torch.ones(B, S, dtype=torch.bool),
        query_x=torch.randn(B, S, 6, generator=g, dtype=torch.double),
        query_y=torch.randint(0, K, (B, S), generator=g),
        query_mask=torch.ones(B, S, dtype=torch.bool),
    )
    hvae = _tiny_hyperclip("hvae").generator
    torch.manual_seed(3)
    z = hvae.adapted_latents(batch)
    torch.manual_seed(3)
    mu, logvar = hvae.posterior(hvae.hnet.support_latents(batch))
    torch.testing.assert_close(z, hvae.vae.sample(mu, logvar))
    hnet = _tiny_hyperclip("hnet").generator
    torch.testing.assert_close(hnet.adapted_latents(batch), hnet.support_latents(batch))
    stage = _tiny_hyperclip("hvae")
    seen = []
    stage.generator.adapted_latents = lambda b: seen.append(b) or torch.zeros(len(b), 4, dtype=torch.double)
    stage.retrieval_hits(batch, torch.randn(12, 5, dtype=torch.double))
    assert seen == [batch]
