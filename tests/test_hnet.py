"""HNet-MAML: the batched meta-gradient against a plain per-task autograd loop; latent adaptation."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meta_vqa.data.batch import TaskBatch
from meta_vqa.meta.maml import InnerLoop
from meta_vqa.stages.hnet import HNetStage

DIM, HIDDEN, LATENT = 10, 4, 5


def make_batch(n_tasks=5, k=3, seed=0) -> TaskBatch:
    """Tasks of different sizes, padded into one batch (double precision)."""
    g = torch.Generator().manual_seed(seed)
    sizes_s, sizes_q = [7, 3, 9, 5, 4][:n_tasks], [4, 6, 2, 5, 3][:n_tasks]
    S, Q = max(sizes_s), max(sizes_q)
    return TaskBatch(
        task=torch.arange(n_tasks),
        question=torch.zeros(n_tasks, DIM, dtype=torch.double),
        answers=torch.randn(n_tasks, k, DIM, generator=g, dtype=torch.double),
        answer_mask=torch.ones(n_tasks, k, dtype=torch.bool),
        support_x=torch.randn(n_tasks, S, DIM, generator=g, dtype=torch.double),
        support_y=torch.randint(0, k, (n_tasks, S), generator=g),
        support_mask=torch.arange(S) < torch.tensor(sizes_s).unsqueeze(1),
        query_x=torch.randn(n_tasks, Q, DIM, generator=g, dtype=torch.double),
        query_y=torch.randint(0, k, (n_tasks, Q), generator=g),
        query_mask=torch.arange(Q) < torch.tensor(sizes_q).unsqueeze(1),
    )


def make_stage(**kw) -> HNetStage:
    torch.manual_seed(0)
    kw = {"feature_dim": DIM, "adapter_hidden": HIDDEN, "latent_dim": LATENT, "hnet_hidden": (8, 8)} | kw
    return HNetStage(inner_steps=3, inner_lr=0.05, **kw).double()


def reference_logits(stage: HNetStage, z, x, answers):
    """G_θ(z) and the adapter for ONE task, written out with F.linear (no batching, no shared code)."""
    h = z
    layers = stage.hnet.layers
    for i, layer in enumerate(layers):
        h = F.linear(h, layer.weight, layer.bias)
        if i < len(layers) - 1:
            h = torch.relu(h)
    d, hid = DIM, HIDDEN
    w1, w2 = h[: hid * d].view(hid, d), h[hid * d : 2 * hid * d].view(d, hid)
    b1, b2 = h[2 * hid * d : 2 * hid * d + hid], h[2 * hid * d + hid :]
    y = F.linear(torch.relu(F.linear(x, w1 / math.sqrt(d), b1)), w2 / math.sqrt(hid), b2) + x
    return 100 * F.normalize(y, dim=-1) @ F.normalize(answers, dim=-1).T


def reference_meta_grad(stage: HNetStage, batch: TaskBatch, first_order: bool) -> dict[str, torch.Tensor]:
    """One task at a time: inner GD on the latent (support), outer CE (query); mean of the gradients."""
    params = dict(stage.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    B = len(batch)
    for b in range(B):
        xs, ys = batch.support_x[b][batch.support_mask[b]], batch.support_y[b][batch.support_mask[b]]
        xq, yq = batch.query_x[b][batch.query_mask[b]], batch.query_y[b][batch.query_mask[b]]
        a = batch.answers[b]
        z = stage.z0 if not first_order else stage.z0.detach().clone().requires_grad_()
        z_start = z
        for _ in range(stage.train_loop.steps):
            loss = F.cross_entropy(reference_logits(stage, z, xs, a), ys)
            (g,) = torch.autograd.grad(loss, z, create_graph=not first_order)
            z = z - stage.train_loop.lr * g
            if first_order:
                z = z.detach().requires_grad_()
        outer = F.cross_entropy(reference_logits(stage, z, xq, a), yq)
        names = [k for k in params if k != "z0"]
        wrt = [params[k] for k in names] + [z if first_order else z_start]
        grads = torch.autograd.grad(outer, wrt, allow_unused=True)
        for k, g in zip([*names, "z0"], grads):
            if g is not None:
                total[k] += g / B  # first-order: the gradient at the adapted latent goes straight to z0
    return total


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batched_meta_gradient_equals_per_task_loop(first_order, chunk_size):
    stage = make_stage(first_order=first_order, chunk_size=chunk_size)
    batch = make_batch()
    B = len(batch)
    stage.zero_grad()
    stats = stage.meta_gradient(batch.chunks(chunk_size))
    assert stats.tasks == B
    ref = reference_meta_grad(stage, batch, first_order)
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-7, atol=1e-10, msg=name)
    assert stage.z0.grad.abs().sum() > 0 and stage.hnet.layers[0].weight.grad.abs().sum() > 0


def test_second_order_really_differs():
    batch = make_batch()
    fo, so = reference_meta_grad(make_stage(), batch, True), reference_meta_grad(make_stage(), batch, False)
    assert (fo["hnet.layers.0.weight"] - so["hnet.layers.0.weight"]).abs().max() > 1e-8


def test_reversed_direction_uses_query_inside_and_support_outside():
    batch = make_batch()
    swapped = TaskBatch(
        **{
            **vars(batch),
            "support_x": batch.query_x,
            "support_y": batch.query_y,
            "support_mask": batch.query_mask,
            "query_x": batch.support_x,
            "query_y": batch.support_y,
            "query_mask": batch.support_mask,
        }
    )
    rev = make_stage(inner_split="query", outer_split="support")
    fwd = make_stage()
    rev.meta_gradient([batch])
    fwd.meta_gradient([swapped])
    for (name, a), b in zip(rev.named_parameters(), fwd.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_support_latents_match_per_task_and_keep_the_task_order(chunk_size):
    stage = make_stage(chunk_size=chunk_size)
    batch = make_batch()
    loop = InnerLoop(4, 0.1)
    z = stage.support_latents(batch, loop)
    for b in range(len(batch)):
        one = stage.support_latents(batch.select(torch.tensor([b])), loop)
        torch.testing.assert_close(z[b], one[0])
    z0 = stage.init_latents(batch.task).detach()
    before = stage.query_accuracy(z0, batch)
    assert z.shape == (len(batch), LATENT) and not torch.equal(z, z0) and before.shape == (len(batch),)


def test_hypernetwork_init_follows_the_authors():
    stage = HNetStage(feature_dim=32, adapter_hidden=16, latent_dim=128, hnet_hidden=(128, 128, 128))
    layers = stage.hnet.layers
    assert [(lay.in_features, lay.out_features) for lay in layers] == [
        (128, 128),
        (128, 128),
        (128, 128),
        (128, stage.adapter.num_params),
    ]
    assert all(lay.bias.abs().sum() == 0 for lay in layers)
    assert abs(layers[-1].weight.std().item() - 1 / math.sqrt(128)) < 0.01  # linear gain
    assert abs(layers[0].weight.std().item() - math.sqrt(2 / 128)) < 0.02  # ReLU gain
    assert stage.z0.shape == (128,)
    from meta_vqa.stages.generator import LatentGenerator

    assert isinstance(stage, LatentGenerator) and stage.kind == "hnet"  # what guidance stages build on
    torch.testing.assert_close(
        stage.weights(stage.init_latents(torch.arange(2))), stage.hnet(stage.z0).expand(2, -1)
    )


@pytest.mark.parametrize("dataset", ["smoke", "easy_vqa", "meta_vqa"])
@pytest.mark.parametrize(
    "stage, verb",
    [("hnet", "fit"), ("adapt", "predict"), ("hvae", "fit"), ("hyperclip", "fit"), ("hyperldm", "fit")],
)
def test_configs_parse(dataset, stage, verb, capsys):
    from pathlib import Path

    import yaml

    from meta_vqa.cli import main

    config = Path(__file__).resolve().parents[1] / "conf" / dataset / f"{stage}.yaml"
    assert main([verb, "-c", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("meta_vqa.stages.")


def _group_budget(stage: HNetStage, tasks: int) -> float:
    """max_chunk_mib whose groups hold ``tasks`` double-precision weight vectors."""
    from meta_vqa.meta.maml import GROUP_COPIES

    return 2 * GROUP_COPIES * stage.adapter.num_params * 8 * (tasks + 0.5) / 2**20


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("tasks_per_group", [None, 2])
def test_planned_meta_gradient_equals_per_task_loop(first_order, tasks_per_group):
    stage = make_stage(first_order=first_order)
    if tasks_per_group:
        stage = make_stage(first_order=first_order, max_chunk_mib=_group_budget(stage, tasks_per_group))
    stage.budget = replace(stage.budget, bucket_flops=0)  # toy sizes: still one bucket per padding bound
    batch = make_batch()
    stage.zero_grad()
    stats = stage.meta_gradient(batch)
    assert stats.tasks == len(batch)
    ref = reference_meta_grad(stage, batch, first_order)
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-7, atol=1e-10, msg=name)


def test_one_pass_through_the_hypernetwork_per_step_for_the_whole_group():
    """The shared layers see every task of a group at once: steps + 1 forward passes per meta-step."""
    stage = make_stage(max_chunk_mib=None)
    batch = make_batch()
    rows = []
    handle = stage.hnet.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    stage.meta_gradient(batch)
    handle.remove()
    assert rows == [len(batch)] * (stage.train_loop.steps + 1)


@pytest.mark.parametrize("tasks_per_group", [None, 2])
def test_planned_support_latents_equal_per_task(tasks_per_group):
    stage = make_stage()
    stage = make_stage(max_chunk_mib=_group_budget(stage, tasks_per_group) if tasks_per_group else None)
    stage.budget = replace(stage.budget, bucket_flops=0)
    batch = make_batch()
    for loop in (InnerLoop(4, 0.1), InnerLoop(4, 0.05, True, "adam")):
        z = stage.support_latents(batch, loop)
        for b in range(len(batch)):
            one = stage.support_latents(batch.select(torch.tensor([b])), loop)
            torch.testing.assert_close(z[b], one[0], rtol=1e-9, atol=1e-12)


def test_planned_evaluation_equals_one_setting_and_one_task_at_a_time():
    """Protocol.evaluate fine-tunes every setting in one planned call; its hits equal those of a plain
    autograd loop on each setting and task alone (the masked support, no planning)."""
    from meta_vqa.eval.protocol import Protocol, kshot_masks, query_hits
    from meta_vqa.meta.maml import adapt, adapt_tasks
    from meta_vqa.nets.adapter import task_losses

    stage = make_stage(max_chunk_mib=None)
    g = torch.Generator().manual_seed(3)
    batch = make_batch(n_tasks=4)
    batch.support_y = torch.randint(0, 2, batch.support_y.shape, generator=g)  # 2 answers: k-shot eligible
    proto = Protocol(InnerLoop(3, 0.1), max_shots=2, full=True, seed=5, budget=stage.budget)
    z0 = stage.init_latents(batch.task).detach()
    res = proto.evaluate(stage.adapter, batch, z0, stage.weights)
    for s in (0, "full", 1, 2):
        smask, qmask = batch.support_mask, batch.query_mask
        if s not in (0, "full"):
            smask, qmask, _ = kshot_masks(batch, s, 2, 5)
        for b in range(len(batch)):
            one = batch.select(torch.tensor([b]))
            sm, qm = (
                smask[b : b + 1, : one.support_mask.shape[1]],
                qmask[b : b + 1, : one.query_mask.shape[1]],
            )

            def loss(p, one=one, sm=sm):
                logits = stage.adapter(stage.weights(p), one.support_x, one.answers, one.answer_mask)
                return task_losses(logits, one.support_y, sm)

            z = z0[b : b + 1] if s == 0 else adapt(z0[b : b + 1], loss, proto.loop, track_meta_grad=False)
            correct, total = query_hits(stage.adapter, one, z, stage.weights, qm)
            assert res["model"][s].correct[b] == correct[0] and res["model"][s].total[b] == total[0], (s, b)
    # several problems in one call equal one call each
    both = adapt_tasks([batch, batch], [z0, z0 + 0.1], stage.adapter, proto.loop, stage.weights)
    alone = adapt_tasks([batch], [z0 + 0.1], stage.adapter, proto.loop, stage.weights)[0]
    torch.testing.assert_close(both[1], alone, rtol=1e-9, atol=1e-12)


# --- Conditional HNet-MAML (condition: question) -----------------------------------------------------------
def _questions(batch: TaskBatch, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return replace(batch, question=torch.randn(len(batch), DIM, generator=g, dtype=torch.double))


def test_conditional_start_latent_begins_at_z0_and_the_outer_gradient_reaches_z0_theta_and_f():
    """At initialisation z0 + f(e_q) = z0 (f's output layer is zero), so the first meta-step equals
    HNet-MAML's; first-order, the outer gradient of task b at its adapted latent, g_b, is the gradient at its
    start latent: z0 gets mean_b g_b, f's output bias the same, f's output weight mean_b g_b h_bᵀ
    (h_b = f's hidden features of question b)."""
    cond, plain = make_stage(condition="question", question_dim=DIM), make_stage()
    assert (cond.method, plain.method) == ("cond_hnet_maml", "hnet_maml")
    assert cond.conditional and not plain.conditional
    batch = _questions(make_batch())
    torch.testing.assert_close(cond.start_latents(batch), cond.z0.expand(len(batch), -1))
    torch.testing.assert_close(cond.init_params(batch), cond.start_latents(batch))
    cond.meta_gradient(batch)
    plain.meta_gradient(batch)
    for name, p in plain.named_parameters():  # θ and z0: exactly HNet-MAML's first step
        torch.testing.assert_close(dict(cond.named_parameters())[name].grad, p.grad, msg=name)
    assert cond.hnet.layers[0].weight.grad.abs().sum() > 0 and cond.z0.grad.abs().sum() > 0
    out = cond.cond.layers[-1]
    torch.testing.assert_close(out.bias.grad, cond.z0.grad)
    per_task = []
    for b in range(len(batch)):  # g_b: the z0 gradient of task b alone
        one = make_stage(condition="question", question_dim=DIM)
        one.meta_gradient(batch.select(torch.tensor([b])))
        per_task.append(one.z0.grad)
    h = cond.cond.features(batch.question)
    expected = sum(torch.outer(g, h[b]) for b, g in enumerate(per_task)) / len(batch)
    torch.testing.assert_close(out.weight.grad, expected)
    assert out.weight.grad.abs().sum() > 0  # f is meta-learned


def test_conditional_start_is_where_validation_test_and_fine_tuning_begin():
    stage = make_stage(condition="question", question_dim=DIM)
    with torch.no_grad():  # a trained f: different questions, different start latents
        stage.cond.layers[-1].weight.normal_(generator=torch.Generator().manual_seed(2))
    batch = _questions(make_batch())
    start = stage.start_latents(batch).detach()
    assert (start[0] - start[1]).abs().max() > 0 and (start[0] - stage.z0).abs().max() > 0
    torch.testing.assert_close(stage.init_params(batch).detach(), start)  # meta-training and test
    torch.testing.assert_close(stage.support_latents(batch, InnerLoop(0, 0.1)), start)  # few-shot, predict
    stage.test_step(batch, 0)  # the test protocol: zero-shot = the conditional start
    rec = {r["shots"]: r for r in stage.collector.records("random", 0) if r["method"] == "cond_hnet_maml"}
    acc = stage.query_accuracy(start, batch)
    assert rec[0]["accuracy"] == pytest.approx(acc.mean().item())
    assert {0, "full"} <= set(rec)


@pytest.mark.slow
def test_conditional_hnet_smoke_fit_and_test(synthetic_root, tmp_path, monkeypatch):
    """conf/smoke/hnet.yaml with condition: question trains, tests as cond_hnet_maml, and is refused as the
    generator of the later stages (they build on the unconditional HNet)."""
    import json

    from meta_vqa.cli import main
    from meta_vqa.errors import ConfigError
    from meta_vqa.stages.hvae import HVAEStage

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "conf" / "smoke" / "hnet.yaml"
    args = ["fit", "-c", str(config), "--data.root", str(synthetic_root), "--stage_dir", str(tmp_path / "c")]
    args += ["--model.init_args.condition", "question", "--trainer.max_steps", "10"]
    args += ["--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false"]
    assert main([*args, "--test_after_fit", "true"]) == 0
    records = json.loads((tmp_path / "c" / "results.json").read_text())
    shots = {r["shots"] for r in records if r["method"] == "cond_hnet_maml"}
    assert {0, "full", 1} <= shots and "hnet_maml" not in {r["method"] for r in records}
    assert all(0 <= r["accuracy"] <= 100 for r in records)
    with pytest.raises(ConfigError, match="Conditional HNet-MAML"):
        HVAEStage(upstream_ckpt=str(tmp_path / "c" / "best.ckpt"), feature_dim=32)
