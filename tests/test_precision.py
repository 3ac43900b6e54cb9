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
