"""Mixed precision: float16 is refused on a CPU in one line; the MAML stages' manual optimisation takes
float16 steps through a gradient scaler (clipping after unscaling) and stays finite; losses stay float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meta_vqa.cli import main
from meta_vqa.nets.vae import vae_loss
from meta_vqa.nets.weight_encoder import contrastive_loss

REPO = Path(__file__).resolve().parents[1]
HNET = str(REPO / "conf" / "smoke" / "hnet.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU runs 16-mixed")
def test_float16_on_a_cpu_is_one_error_line(synthetic_root, tmp_path, capfd):
    args = ["fit", "-c", HNET, "--data.root", str(synthetic_root), "--stage_dir", str(tmp_path)]
    assert main([*args, "--trainer.precision", "16-mixed"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.precision: 16-mixed") and "bf16-mixed" in err[-1]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_manual_optimisation_steps_through_a_float16_gradient_scaler(synthetic_root, tmp_path, monkeypatch):
    """16-mixed's scaler on a CPU (Lightning's MixedPrecision plugin; the CLI flag wants CUDA): the
    skipped overflow steps back the scale off, the others step, and the weights stay finite."""
    monkeypatch.chdir(tmp_path)
    plugin = tmp_path / "fp16.yaml"
    plugin.write_text(
        "trainer:\n  precision: null\n  plugins:\n"
        "    - class_path: lightning.pytorch.plugins.precision.MixedPrecision\n"
        "      init_args: {precision: 16-mixed, device: cpu}\n"
    )
    args = ["fit", "-c", HNET, "-c", str(plugin), "--data.root", str(synthetic_root), "--stage_dir", "out"]
    args += [
        "--trainer.max_steps",
        "6",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "out" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    scaler = ckpt["MixedPrecision"]
    assert scaler["scale"] < 65536.0 and scaler["_growth_tracker"] >= 1  # backed off, then stepped
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_losses_are_float32_under_autocast():
    u = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    w = torch.randn(6, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c32 = contrastive_loss(u.bfloat16(), v.bfloat16(), 100.0)
        total, _, _ = vae_loss(w.bfloat16() + 0.1, w.bfloat16(), u.bfloat16(), v.bfloat16())
    assert c32.dtype == torch.float32 and total.dtype == torch.float32
    exact = contrastive_loss(u.bfloat16().float(), v.bfloat16().float(), 100.0)
    assert torch.allclose(c32, exact, atol=1e-5)  # the logits were not lowered again


def test_a_fused_optimizer_with_clipping_under_a_gradient_scaler_is_used_unfused():
    """16-mixed + gradient clipping + a fused Adam (the configs' choice): a fused optimizer unscales inside
    its step, so Lightning cannot clip before it; the stage builds the same optimizer unfused instead (and
    keeps it fused without a scaler or without clipping)."""
    from functools import partial
    from types import SimpleNamespace

    from meta_vqa.stages.base import BaseStage

    def stage(grad_clip):
        return BaseStage(
            variant="uncond_multitask", feature_dim=8, question_dim=8, adapter_hidden=4, grad_clip=grad_clip,
            optimizer=partial(torch.optim.Adam, lr=0.01, fused=True),
        )  # fmt: skip

    s = stage(10.0)
    assert s.configure_optimizers().defaults["fused"] is True  # no trainer, no scaler
    s._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    with pytest.warns(UserWarning, match="unfused"):
        opt = s.configure_optimizers()
    assert opt.defaults["fused"] is False and opt.defaults["lr"] == 0.01
    assert len(opt.param_groups[0]["params"]) == len([p for p in s.parameters() if p.requires_grad])
    s = stage(None)
    s._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    assert s.configure_optimizers().defaults["fused"] is True
