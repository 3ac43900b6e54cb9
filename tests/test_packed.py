"""The packed linear layer (the hypernetwork's wide output layer on CPU): the same values and gradients as
``nn.Linear`` bit for bit, the default path at the row counts where the packed kernel would sum in another
order, the weight gradient left out where the backward pass does not reach the weight, a new packed copy
after every in-place change of the weight, and the same bits through a whole HNet-MAML step and a whole
Lightning run with packing on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from meta_vqa.meta.maml import InnerLoop
from meta_vqa.nets import packed
from meta_vqa.nets.hypernet import MLP
from meta_vqa.nets.packed import PackedLinear

needs_packing = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and packed._self_check()),
    reason="no oneDNN packed linear in this torch build",
)


@pytest.fixture(autouse=True)
def packing_on(monkeypatch):
    """The packed path is on unless the environment turns it off: these tests turn it on whatever the
    environment says (a test may turn it off again)."""
    monkeypatch.setenv("META_VQA_PACKED_LINEAR", "1")


def layer(in_dim: int = 24, out_dim: int = 300, seed: int = 0) -> PackedLinear:
    """A packed layer whose weight has been read once already: its next forward passes are packed."""
    torch.manual_seed(seed)
    lin = PackedLinear(in_dim, out_dim)
    with torch.no_grad():
        lin.bias.normal_()
        lin(torch.zeros(1, in_dim))
    return lin


def copy_of(lin: PackedLinear):
    hit = packed._PACKS.get(lin.weight)
    return None if hit is None else hit[1]


def mm_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for ev in prof.events() if ev.name == "aten::mm")


@needs_packing
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (33, 24), (3, 5, 24)])
def test_forward_and_gradients_equal_nn_linear(shape):
    lin = layer()
    x = torch.randn(*shape, requires_grad=True)
    y = lin(x)
    ref = F.linear(x, lin.weight, lin.bias)
    assert y.shape == ref.shape == (*shape[:-1], 300)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, lin.weight, lin.bias), g)
    want = torch.autograd.grad(ref, (x, lin.weight, lin.bias), g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_packing
def test_the_packed_kernel_runs_only_where_it_sums_in_the_default_order(monkeypatch):
    """A pass with fewer rows than ``exact_from`` of its shape runs ``F.linear``; one with at least that
    many runs the packed kernel; a shape at which the packed kernel never agrees is never packed."""
    lin = layer()
    x = torch.randn(40, 24)
    lin(x)  # the copy exists from here on
    assert packed.exact_from(lin.weight, lin.bias, copy_of(lin)) is not None

    def kernels(rows):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = lin(x[:rows])
        assert torch.equal(y, F.linear(x[:rows], lin.weight, lin.bias))
        return any(ev.name.startswith("mkldnn::") for ev in prof.events())

    monkeypatch.setitem(packed._EXACT_FROM, (300, 24), 10)
    assert not kernels(9) and kernels(10) and kernels(40)
    monkeypatch.setitem(packed._EXACT_FROM, (300, 24), None)
    assert not kernels(10) and not kernels(40)


@needs_packing
def test_exact_from_is_where_every_checked_row_count_agrees():
    """The measured threshold: every checked row count from it on gives F.linear's bits with the packed
    kernel, and the count just below it (if any) does not; measuring it leaves the global random state
    alone."""
    lin = layer(128, 4000)
    lin(torch.randn(8, 128))
    copy = copy_of(lin)
    packed._EXACT_FROM.pop((4000, 128), None)
    state = torch.get_rng_state()
    lowest = packed.exact_from(lin.weight, lin.bias, copy)
    assert torch.equal(torch.get_rng_state(), state)
    assert lowest is not None

    def agrees(rows):
        x = torch.randn(rows, 128)
        y = torch.ops.mkldnn._linear_pointwise(x, copy, lin.bias.detach(), "none", [], "")
        return torch.equal(y, F.linear(x, lin.weight.detach(), lin.bias.detach()))

    assert all(agrees(r) for r in packed.CHECK_ROWS if r >= lowest)
    if lowest > 1:  # the count below it disagreed on the draw that measured it, and on fresh ones
        assert not all(agrees(lowest - 1) for _ in range(3))


@needs_packing
def test_the_weight_gradient_is_formed_only_where_the_backward_pass_reaches_the_weight():
    lin = layer()
    x = torch.randn(32, 24, requires_grad=True)
    # to the input only (the inner loop's gradient with respect to the latents): one product, g W
    assert mm_calls(lambda: torch.autograd.grad(lin(x).square().sum(), x)) == 1
    assert lin.weight.grad is None
    # to every leaf: g W and gᵀ x
    assert mm_calls(lambda: lin(x).square().sum().backward()) == 2
    assert lin.weight.grad is not None and lin.bias.grad is not None
    lin.weight.grad = lin.bias.grad = None
    # to the weight only (an input that needs no gradient)
    assert mm_calls(lambda: lin(x.detach()).square().sum().backward()) == 1
    assert x.grad is not None and lin.weight.grad is not None  # x.grad from the call before


@needs_packing
def test_second_order_gradients_equal_nn_linear():
    """The backward pass is made of differentiable ops: a gradient of a gradient (second-order MAML)
    through the layer equals nn.Linear's."""
    lin = layer(8, 40)
    x = torch.randn(6, 8, requires_grad=True)

    def second(f):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (lin.weight, lin.bias))

    got = second(lin)
    want = second(lambda z: F.linear(z, lin.weight, lin.bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_packing
def test_an_in_place_change_of_the_weight_packs_it_again_at_its_second_pass():
    lin = layer()
    x = torch.randn(4, 24)
    lin(x)
    first = copy_of(lin)
    assert first is not None
    assert packed.packed_weight(lin.weight, 4) is first  # unchanged weight: the same copy
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).sum().backward()
    opt.step()  # an in-place update
    for _ in range(2):  # the first pass of the new version reads the weight as it is, the second packs it
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert copy_of(lin) is not None and copy_of(lin) is not first
    lin.load_state_dict(nn.Linear(24, 300).state_dict())  # copies into the parameters in place
    assert copy_of(lin) is not None  # dropped at the next pass, not before
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert copy_of(lin) is None
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@needs_packing
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),  # writes without bumping the version counter
        lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
    ],
    ids=["adam-fused", "adam-foreach", "adamw-loop", "sgd"],
)
def test_training_with_any_optimizer_equals_nn_linear(make_opt):
    """Each step reads the weight three times (so it is packed) before the optimizer changes it: the packed
    layer never computes with a copy of an older weight, whatever the optimizer's kernel."""
    lin, ref = layer(), nn.Linear(24, 300)
    ref.load_state_dict(lin.state_dict())
    x, target = torch.randn(6, 24), torch.randn(6, 300)
    opts = make_opt(list(lin.parameters())), make_opt(list(ref.parameters()))
    for step in range(4):
        for net, opt in zip((lin, ref), opts):
            opt.zero_grad()
            with torch.no_grad():
                net(x), net(x)
            (net(x) - target).square().mean().backward()
            opt.step()
        assert copy_of(lin) is None  # the step dropped the copy of the weight it changed
        torch.testing.assert_close(lin.weight, ref.weight, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            lin(x)  # the first pass of the new weight
            torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)
        assert copy_of(lin) is not None, step


@needs_packing
def test_a_weight_read_once_per_version_is_never_packed():
    """Plain training (one forward pass per optimizer step) never pays for a reorder."""
    lin = PackedLinear(24, 300)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            opt.zero_grad()
            lin(torch.randn(8, 24)).square().mean().backward()
            opt.step()
    names = [ev.name for ev in prof.events()]
    assert not any(n.startswith("mkldnn::") for n in names)
    assert copy_of(lin) is None


@needs_packing
def test_no_grad_and_inference_mode():
    lin = layer()
    x = torch.randn(5, 24)
    ref = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    packed.forget(lin.weight)
    with torch.inference_mode():  # the packed copy made here is used outside it too
        for _ in range(2):
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    assert copy_of(lin) is not None
    y = lin(x.requires_grad_())
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)


def test_falls_back_to_nn_linear_off_the_packed_path(monkeypatch):
    def check(lin, x):
        packed.forget(lin.weight)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            lin(x)
            y = lin(x)  # a second pass of the same weight: the one that would pack it
        names = {ev.name for ev in prof.events()}
        assert not any(n.startswith("mkldnn::") for n in names), names
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
        assert lin.weight not in packed._PACKS

    check(layer().double(), torch.randn(3, 24, dtype=torch.float64))  # float64: nn.Linear's forward
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the weight: nn.Linear's forward
        lin = layer()
        lin(torch.randn(3, 24))
        y = lin(torch.randn(3, 24))
        assert y.dtype == torch.bfloat16 and lin.weight not in packed._PACKS
    monkeypatch.setenv("META_VQA_PACKED_LINEAR", "0")  # turned off
    check(layer(), torch.randn(3, 24))


def test_mlp_packs_only_a_wide_output_layer():
    wide = MLP(16, [32], packed.MIN_WEIGHTS // 32)
    assert [type(m) for m in wide.layers] == [nn.Linear, PackedLinear]
    narrow = MLP(16, [32], 64)
    assert [type(m) for m in narrow.layers] == [nn.Linear, nn.Linear]
    assert list(wide.state_dict()) == list(narrow.state_dict())  # the same keys as nn.Linear's


@needs_packing
def test_hnet_maml_step_is_the_same_with_packing_on_and_off(monkeypatch):
    """A meta-gradient and the adapted latents of a small HNet whose output layer is packed equal those of
    the same HNet with packing turned off, bit for bit."""
    from meta_vqa.bench.maml import draw_sizes, make_batch
    from meta_vqa.stages.hnet import HNetStage

    monkeypatch.setattr(packed, "MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    stage = HNetStage(
        feature_dim=32, question_dim=32, adapter_hidden=16, latent_dim=8, hnet_hidden=(16, 16), inner_steps=3
    )
    assert isinstance(stage.hnet.layers[-1], PackedLinear)
    batch = make_batch(draw_sizes(6, np.random.default_rng(0)), 32, 32, torch.device("cpu"), 0)
    params = [p for p in stage.parameters() if p.requires_grad]

    def run():
        stage.zero_grad(set_to_none=True)
        stats = stage.meta_gradient(batch)
        grads = torch.cat([p.grad.flatten() for p in params])
        return stats.loss, grads, stage.support_latents(batch, InnerLoop(3, 0.1, True))

    loss_on, grads_on, latents_on = run()
    assert copy_of(stage.hnet.layers[-1]) is not None
    monkeypatch.setenv("META_VQA_PACKED_LINEAR", "0")
    loss_off, grads_off, latents_off = run()
    assert torch.equal(loss_on, loss_off)
    assert torch.equal(grads_on, grads_off)
    assert torch.equal(latents_on, latents_off)


@needs_packing
def test_every_packed_pass_of_a_lightning_run_reads_the_current_weight(synthetic_root, tmp_path, monkeypatch):
    """A whole `meta-vqa fit` of the smoke HNet-MAML (fused Adam, validation every epoch, the best checkpoint
    loaded back for the test) with the output layer packed: every packed forward pass gives ``F.linear``'s
    output on the weight as it is at that moment, bit for bit, so nothing Lightning or the optimizer does to
    the weight (steps, checkpoint loads, evaluation modes) leaves a stale packed copy in use; and the
    checkpoint is the one of the same run with packing off, bit for bit."""
    from pathlib import Path

    from meta_vqa.cli import main

    monkeypatch.setattr(packed, "MIN_WEIGHTS", 0)
    seen = {"passes": 0, "worst": 0.0}
    forward = packed._PackedLinearFn.forward

    def checked(ctx, x, weight, bias, copy):
        y = forward(ctx, x, weight, bias, copy)
        ref = F.linear(x, weight, bias)
        seen["passes"] += 1
        seen["worst"] = max(seen["worst"], (y - ref).abs().max().item())
        return y

    monkeypatch.setattr(packed._PackedLinearFn, "forward", staticmethod(checked))
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "conf" / "smoke" / "hnet.yaml"
    args = ["fit", "-c", str(config), "--data.root", str(synthetic_root), "--stage_dir", str(tmp_path / "h")]
    args += ["--trainer.max_steps", "12", "--trainer.check_val_every_n_epoch", "1"]
    args += ["--model.init_args.optimizer.init_args.fused", "true", "--trainer.enable_progress_bar", "false"]
    assert main([*args, "--test_after_fit", "true"]) == 0
    assert seen["passes"] > 50, seen  # inner steps, outer passes, validation and test all went through it
    assert seen["worst"] == 0.0, seen
    monkeypatch.setenv("META_VQA_PACKED_LINEAR", "0")
    passes = seen["passes"]
    args[args.index(str(tmp_path / "h"))] = str(tmp_path / "plain")
    assert main([*args, "--test_after_fit", "true"]) == 0
    assert seen["passes"] == passes  # the second run never packed

    def weights(folder):
        ckpt = torch.load(tmp_path / folder / "last.ckpt", map_location="cpu", weights_only=False)
        return ckpt["state_dict"]

    on, off = weights("h"), weights("plain")
    assert list(on) == list(off) and all(torch.equal(on[k], off[k]) for k in on)
