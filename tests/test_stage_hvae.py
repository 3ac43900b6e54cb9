"""The chain hnet → adaptation dataset → hvae through the CLI (tiny configs, synthetic data)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meta_vqa.cli import main
from meta_vqa.data.features import save_tensors
from meta_vqa.io import sha256_file, write_json
from meta_vqa.stages.generator import LatentGenerator
from meta_vqa.stages.hvae import HVAEStage

REPO = Path(__file__).resolve().parents[1]
ADAPT = str(REPO / "conf" / "smoke" / "adapt.yaml")
HVAE = str(REPO / "conf" / "smoke" / "hvae.yaml")


def _acc(records, method, shots):
    return next(r["accuracy"] for r in records if r["method"] == method and r["shots"] == shots)


def _hvae_args(chain, *extra, verb="fit"):
    args = [verb, "-c", HVAE, "--data.root", str(chain["root"]), "--trainer.enable_progress_bar", "false"]
    if verb == "fit":
        args += ["--model.init_args.upstream_ckpt", str(chain["hnet_ckpt"])]
        args += ["--data.adaptation", str(chain["adaptation"])]
    return [*args, *extra]


@pytest.fixture(scope="module")
def chain(smoke_hnet, tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("chain")
    monkeypatch_module.chdir(work)
    # a private copy of the HNet checkpoint: a later test deletes it
    hnet_ckpt = work / "hnet.ckpt"
    shutil.copy(smoke_hnet["ckpt"], hnet_ckpt)
    adaptation = work / "adaptation"
    args = ["predict", "-c", ADAPT, "--data.root", str(smoke_hnet["root"]), "--ckpt_path", str(hnet_ckpt)]
    assert main([*args, "--stage_dir", str(adaptation)]) == 0
    chain = {"root": smoke_hnet["root"], "hnet_ckpt": hnet_ckpt, "adaptation": adaptation, "work": work}
    out = work / "hvae_results"
    assert main(_hvae_args(chain, "--model.init_args.results_dir", str(out), "--test_after_fit", "true")) == 0
    chain["results"] = json.loads((out / "results.json").read_text())
    chain["hvae_ckpt"] = next((work / "lightning_logs").rglob("best.ckpt"))
    chain["hnet_results"] = smoke_hnet["results"]
    return chain


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_chain_beats_chance_and_writes_the_records(chain):
    hnet, hvae = chain["hnet_results"], chain["results"]
    chance = _acc(hvae, "chance", 0)
    assert {r["method"] for r in hvae} == {"hvae", "hvae_recon", "chance", "majority"}
    assert {r["shots"] for r in hvae if r["method"] == "hvae"} == {0, "full", 1, 2, 3}
    assert _acc(hnet, "hnet_maml", "full") > chance + 20
    assert _acc(hnet, "hnet_maml", "full") > _acc(hnet, "hnet_maml", 0)  # adaptation helps
    assert _acc(hvae, "hvae", 0) > chance + 10
    assert _acc(hvae, "hvae", "full") > chance + 10
    assert _acc(hvae, "hvae_recon", "full") > chance + 20


def test_restoring_the_hvae_never_needs_the_hnet_file(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = chain["hvae_ckpt"]
    before = HVAEStage.load_from_checkpoint(ckpt, map_location="cpu")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # a plain-weights checkpoint
    record = state["hyper_parameters"]["upstream"]
    assert record["sha256"] == sha256_file(chain["hnet_ckpt"])
    assert any(k.startswith("upstream.module.hnet.") for k in state["state_dict"])  # self-contained
    chain["hnet_ckpt"].unlink()
    after = HVAEStage.load_from_checkpoint(ckpt, map_location="cpu", upstream_ckpt=None)
    task = torch.arange(4)
    torch.testing.assert_close(
        after.weights(after.init_latents(task)), before.weights(before.init_latents(task))
    )
    torch.testing.assert_close(
        after.hnet.weights(after.hnet.z0[None]), before.hnet.weights(before.hnet.z0[None])
    )
    assert not any(p.requires_grad for p in after.upstream.parameters())
    assert isinstance(after, LatentGenerator) and after.latent_dim == 8
    after.train()
    assert not after.upstream.training and not after.hnet.training  # frozen upstream stays in eval mode
    # the CLI test of the restored checkpoint reproduces the records written right after training
    # (results_dir comes from the checkpoint's hyper-parameters, so the file is written again in place)
    out = chain["work"] / "hvae_results" / "results.json"
    out.unlink()
    assert main([*_hvae_args(chain, "--ckpt_path", str(ckpt), verb="test"), "--data.adaptation", "null"]) == 0
    again = json.loads(out.read_text())
    assert [(r["method"], r["shots"], r["accuracy"]) for r in again] == [
        (r["method"], r["shots"], r["accuracy"]) for r in chain["results"]
    ]


def _one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def test_bad_inputs_are_one_error_line(chain, smoke_hnet, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    ok = dict(chain, hnet_ckpt=smoke_hnet["ckpt"])
    # an adaptation dataset whose latents do not fit the HNet
    bad = tmp_path / "bad_adaptation"
    bad.mkdir()
    tensors = load_file(str(chain["adaptation"] / "adaptation.safetensors"))
    tensors = {k: v[..., :3] if "latents" in k or k == "z0" else v for k, v in tensors.items()}
    save_tensors(bad / "adaptation.safetensors", tensors, metadata={"format": "meta_vqa.adaptation/1"})
    meta = json.loads((chain["adaptation"] / "adaptation.json").read_text())
    meta["sha256"] = {"adaptation.safetensors": sha256_file(bad / "adaptation.safetensors")}
    write_json(bad / "adaptation.json", meta)
    assert main(_hvae_args(dict(ok, adaptation=bad))) == 2
    line = _one_error_line(capfd)
    assert str(bad / "adaptation.safetensors") in line and "latent" in line
    # a truncated / edited file
    (bad / "adaptation.safetensors").write_bytes(b"garbage")
    assert main(_hvae_args(dict(ok, adaptation=bad))) == 2
    assert "sha256 differs" in _one_error_line(capfd)
    # a missing upstream checkpoint, and none at all
    assert main(_hvae_args(dict(ok, hnet_ckpt=tmp_path / "nope.ckpt"))) == 2
    assert f"{tmp_path / 'nope.ckpt'}: checkpoint not found (model.upstream_ckpt)" in _one_error_line(capfd)
    assert main(_hvae_args(ok, "--model.init_args.upstream_ckpt", "null")) == 2
    assert "model.upstream_ckpt: required" in _one_error_line(capfd)
    # a missing adaptation dataset
    assert main(_hvae_args(dict(ok, adaptation=tmp_path / "none"))) == 2
    assert "adaptation dataset not found" in _one_error_line(capfd)


@pytest.mark.parametrize("stage", ["hvae", "hyperclip", "hyperldm"])
def test_every_stage_refuses_an_adaptation_dataset_of_another_hnet(
    stage, chain, smoke_hnet, tmp_path, monkeypatch, capfd
):
    """One hand-off check for every stage that reads an adaptation dataset (latent size and HNet sha256)."""
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(chain["adaptation"], other)
    meta = json.loads((other / "adaptation.json").read_text())
    meta["upstream"]["sha256"] = "0" * 64  # made from some other HNet checkpoint
    write_json(other / "adaptation.json", meta)
    args = ["fit", "-c", str(REPO / "conf" / "smoke" / f"{stage}.yaml"), "--data.root", str(chain["root"])]
    args += ["--model.init_args.upstream_ckpt", str(smoke_hnet["ckpt"]), "--data.adaptation", str(other)]
    assert main([*args, "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]) == 2
    line = _one_error_line(capfd)
    assert str(other) in line and "sha256 000000000000" in line and str(smoke_hnet["ckpt"]) in line


def test_normalized_weights_round_trip_and_travel_with_the_checkpoint(smoke_hnet):
    kw = {"feature_dim": 32, "latent_dim": 4, "hidden": (8,), "normalize": True}
    stage = HVAEStage(upstream_ckpt=str(smoke_hnet["ckpt"]), **kw)
    torch.manual_seed(0)
    lat = stage.hnet.z0.detach() + 0.3 * torch.randn(20, stage.hnet.latent_dim)
    stage.fit_normalizer(lat, chunk=7)
    w = stage.hnet.weights(lat).detach()
    torch.testing.assert_close(stage.w_mean, w.mean(0))
    torch.testing.assert_close(stage.w_scale, w.std(0).mean())  # one scalar: the mean per-dimension std
    torch.testing.assert_close(stage.from_vae(stage.to_vae(w)), w)
    z = torch.randn(3, 4)
    torch.testing.assert_close(stage.weights(z), stage.vae.decode(z) * stage.w_scale + stage.w_mean)
    again = HVAEStage(upstream=stage.hparams.upstream, **kw)  # restoring: no upstream file read
    again.load_state_dict(stage.state_dict())
    torch.testing.assert_close(again.weights(z), stage.weights(z))
