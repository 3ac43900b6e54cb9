"""The batched inner loop against a plain per-task autograd loop (first- and second-order)."""

import math

import pytest
import torch
import torch.nn.functional as F

from meta_vqa.data.batch import TaskBatch
from meta_vqa.meta.maml import (
    GROUP_COPIES,
    BucketedLoss,
    Budget,
    InnerLoop,
    adapt,
    meta_gradient,
    plan_buckets,
    plan_chunks,
    plan_tasks,
    plan_work,
)
from meta_vqa.nets.adapter import ResidualAdapter, task_losses

torch.manual_seed(0)
DIM, HIDDEN = 12, 6


def single_task_logits(w, x, answers):
    """The adapter for one task, written out with F.linear (no batching, no shared code)."""
    d, h = DIM, HIDDEN
    w1 = w[: h * d].view(h, d)
    w2 = w[h * d : 2 * h * d].view(d, h)
    b1 = w[2 * h * d : 2 * h * d + h]
    b2 = w[2 * h * d + h :]
    hid = torch.relu(F.linear(x, w1 / math.sqrt(d), b1))
    y = F.linear(hid, w2 / math.sqrt(h), b2) + x
    return 100 * F.normalize(y, dim=-1) @ F.normalize(answers, dim=-1).T


def make_tasks(n_tasks=5, k=3):
    """Tasks of different sizes, padded into one batch."""
    sizes_s = [7, 3, 9, 5, 4][:n_tasks]
    sizes_q = [4, 6, 2, 5, 3][:n_tasks]
    S, Q = max(sizes_s), max(sizes_q)
    xs, ys, ms, xq, yq, mq = [], [], [], [], [], []
    for ns, nq in zip(sizes_s, sizes_q):
        xs.append(torch.randn(S, DIM))
        ys.append(torch.randint(0, k, (S,)))
        ms.append(torch.arange(S) < ns)
        xq.append(torch.randn(Q, DIM))
        yq.append(torch.randint(0, k, (Q,)))
        mq.append(torch.arange(Q) < nq)
    answers = torch.randn(n_tasks, k, DIM)
    return [torch.stack(t) for t in (xs, ys, ms, xq, yq, mq)] + [answers]


def reference_meta_grad(w0, tasks, steps, lr, first_order):
    """Plain loop: one task at a time, its own autograd graph, then the mean of the meta-gradients."""
    xs, ys, ms, xq, yq, mq, answers = tasks
    grads = torch.zeros_like(w0)
    losses = []
    for b in range(xs.shape[0]):
        w0b = w0.detach().clone().requires_grad_()
        w = w0b
        xs_b, ys_b = xs[b][ms[b]], ys[b][ms[b]]
        for _ in range(steps):
            loss = F.cross_entropy(single_task_logits(w, xs_b, answers[b]), ys_b)
            (g,) = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = (w - lr * g) if not first_order else (w - lr * g).detach().requires_grad_()
        outer = F.cross_entropy(single_task_logits(w, xq[b][mq[b]], answers[b]), yq[b][mq[b]])
        if first_order:
            (g,) = torch.autograd.grad(outer, w)  # FOMAML: gradient at the adapted weights
        else:
            (g,) = torch.autograd.grad(outer, w0b)
        grads += g / xs.shape[0]
        losses.append(outer.item())
    return grads, torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batched_meta_gradient_equals_per_task_loop(first_order, chunk_size):
    adapter = ResidualAdapter(DIM, HIDDEN)
    w0 = (0.5 * torch.randn(adapter.num_params)).double().requires_grad_()
    tasks = [t.double() if t.is_floating_point() else t for t in make_tasks()]
    xs, ys, ms, xq, yq, mq, answers = tasks
    B = xs.shape[0]
    loop = InnerLoop(steps=3, lr=0.05, first_order=first_order)
    batch = TaskBatch(
        torch.arange(B), torch.zeros(B, DIM, dtype=torch.double), answers,
        torch.ones(answers.shape[:2], dtype=torch.bool), xs, ys, ms, xq, yq, mq,
    )  # fmt: skip
    stats = meta_gradient(
        batch.chunks(chunk_size),
        lambda c: w0.expand(len(c), -1),
        lambda p: p,
        adapter,
        loop,
        "support",
        "query",
    )
    ref_grad, ref_losses = reference_meta_grad(w0, tasks, loop.steps, loop.lr, first_order)
    torch.testing.assert_close(stats.loss, ref_losses.double().mean(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w0.grad, ref_grad, rtol=1e-7, atol=1e-9)
    assert w0.grad.abs().sum() > 0


def test_second_order_differs_from_first_order():
    """The Hessian term is really there: the two meta-gradients differ on the same data."""
    adapter = ResidualAdapter(DIM, HIDDEN)
    w0 = torch.randn(adapter.num_params, dtype=torch.double)
    tasks = [t.double() if t.is_floating_point() else t for t in make_tasks()]
    g_fo, _ = reference_meta_grad(w0, tasks, 3, 0.05, True)
    g_so, _ = reference_meta_grad(w0, tasks, 3, 0.05, False)
    assert (g_fo - g_so).abs().max() > 1e-6


def test_adapt_lowers_the_inner_loss_and_zero_steps_is_identity():
    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    xs, ys, ms, *_, answers = make_tasks()
    # small weights: with logit scale 100, large random ones can saturate a task's loss to exactly 0
    init = 0.1 * torch.randn(xs.shape[0], adapter.num_params)

    def inner(p):
        return task_losses(adapter(p, xs, answers), ys, ms)

    adapted = adapt(init, inner, InnerLoop(steps=20, lr=0.1), track_meta_grad=False)
    assert (inner(adapted) < inner(init)).all()
    assert adapt(init, inner, InnerLoop(steps=0), track_meta_grad=False) is not None
    torch.testing.assert_close(adapt(init, inner, InnerLoop(steps=0), track_meta_grad=False), init)


def test_batched_adam_equals_torch_adam_per_task():
    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    xs, ys, ms, *_, answers = make_tasks()
    # small weights: with logit scale 100, large random ones can saturate a task's loss to exactly 0
    init = 0.1 * torch.randn(xs.shape[0], adapter.num_params)
    adapted = adapt(
        init,
        lambda p: task_losses(adapter(p, xs, answers), ys, ms),
        InnerLoop(steps=5, lr=1e-2, optimizer="adam"),
        track_meta_grad=False,
    )
    for b in range(xs.shape[0]):
        p = init[b].clone().requires_grad_()
        opt = torch.optim.Adam([p], lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(single_task_logits(p, xs[b][ms[b]], answers[b]), ys[b][ms[b]]).backward()
            opt.step()
        torch.testing.assert_close(adapted[b], p.detach(), rtol=1e-4, atol=1e-5)


def test_chunk_plan_covers_every_task_once_and_bounds_padding():
    assert plan_chunks([5, 1, 4, 2], None) == [[0, 1, 2, 3]]  # no limit: one chunk in batch order
    assert plan_chunks([5, 1, 4, 2], 2) == [[1, 3], [2, 0]]  # by size, at most 2 per chunk
    # a long-tailed task closes the chunk: padding 3 small tasks to 100 would be far over 1.5x
    assert plan_chunks([10, 10, 10, 100], 4) == [[0, 1, 2], [3]]
    groups = plan_chunks(list(range(1, 30)), 4)
    assert sorted(i for g in groups for i in g) == list(range(29)) and max(map(len, groups)) <= 4


def _batch_of(tasks) -> TaskBatch:
    xs, ys, ms, xq, yq, mq, answers = tasks
    B = xs.shape[0]
    return TaskBatch(
        torch.arange(B), torch.zeros(B, DIM, dtype=xs.dtype), answers,
        torch.ones(answers.shape[:2], dtype=torch.bool), xs, ys, ms, xq, yq, mq,
    )  # fmt: skip


def _budget_for_groups(adapter, tasks_per_group: int) -> Budget:
    """A budget whose groups hold ``tasks_per_group`` double-precision weight vectors."""
    weight_bytes = adapter.num_params * 8
    return Budget(2 * GROUP_COPIES * weight_bytes * (tasks_per_group + 0.5) / 2**20, bucket_flops=0)


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("plan", ["one_group", "groups_of_2", "no_padding", "buckets_of_1"])
def test_planned_meta_gradient_equals_per_task_loop(first_order, plan):
    """Groups through the shared map, buckets through the adapter: the same meta-gradient and loss."""
    adapter = ResidualAdapter(DIM, HIDDEN)
    w0 = (0.5 * torch.randn(adapter.num_params)).double().requires_grad_()
    tasks = [t.double() if t.is_floating_point() else t for t in make_tasks()]
    budget = {
        "one_group": Budget(None),  # toy sizes: the buckets merge into one (below bucket_flops)
        "groups_of_2": _budget_for_groups(adapter, 2),
        "no_padding": Budget(None, max_padding=1.0, bucket_flops=0),
        "buckets_of_1": Budget(None, max_tasks=1),
    }[plan]
    batch = _batch_of(tasks)
    groups = plan_tasks([batch], "support", adapter, budget, torch.double)[1]
    if plan == "groups_of_2":
        assert [len(g.rows) for g in groups] == [2, 1, 2]  # 5 tasks in 3 groups of equal counts
    if plan == "no_padding":  # support sizes 7, 3, 9, 5, 4 all differ: one bucket each
        assert len(groups) == 1 and len(groups[0].buckets) == 5
    if plan == "one_group":
        assert len(groups) == 1 and len(groups[0].buckets) == 1
    loop = InnerLoop(steps=3, lr=0.05, first_order=first_order)
    stats = meta_gradient(
        batch, lambda c: w0.expand(len(c), -1), lambda p: p, adapter, loop, "support", "query", budget=budget
    )
    ref_grad, ref_losses = reference_meta_grad(w0, tasks, loop.steps, loop.lr, first_order)
    torch.testing.assert_close(stats.loss, ref_losses.mean(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w0.grad, ref_grad, rtol=1e-7, atol=1e-9)


def test_plan_bounds_group_memory_and_bucket_padding():
    sizes = [40, 20, 14, 13, 80, 142, 38, 55, 32, 180, 81, 12, 97, 14, 55, 18, 1184, 845]
    weight_bytes, row_bytes = 1000, 10
    budget = Budget(max_mib=2 * GROUP_COPIES * weight_bytes * 5 / 2**20)  # at most 5 tasks per group
    groups = plan_work(sizes, budget, weight_bytes, row_bytes)
    assert sorted(i for g in groups for i in g.rows) == list(range(len(sizes)))
    assert len(groups) == 4 and all(len(g.rows) <= 5 for g in groups)
    for g in groups:
        assert [s.start for s in g.buckets] == [0, *(s.stop for s in g.buckets[:-1])]  # consecutive
        assert g.buckets[-1].stop == len(g.rows)
        for s in g.buckets:
            n = [sizes[i] for i in g.rows[s]]
            assert len(n) == 1 or len(n) * max(n) <= 1.5 * sum(n)
    # no memory bound: one group, the long tail kept apart from the small tasks
    (one,) = plan_work(sizes, Budget(None), weight_bytes, row_bytes)
    last = [sizes[i] for i in one.rows[one.buckets[-1]]]
    assert sorted(last) == [845, 1184]
    # small buckets merge whatever their padding when their work is below a bucket's fixed cost
    assert plan_buckets([1, 10, 100], 1.5, min_rows=300) == [[0, 1, 2]]
    assert plan_buckets([1, 10, 100], 1.5, min_rows=100) == [[0, 1], [2]]
    # the bucket's memory bound: at most 2 tasks of 100 examples fit
    tight = plan_buckets([100] * 5, 1.5, None, max_bytes=2 * (0 + 100 * 10), task_bytes=0, row_bytes=10)
    assert [len(b) for b in tight] == [2, 2, 1]


def test_bucketed_loss_gradient_equals_autograd_on_the_whole_batch():
    """The two-phase gradient (per bucket to the weights, then one pass back through the shared map) is the
    gradient of the summed losses, first- and second-order (its own gradient)."""
    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    tasks = [t.double() if t.is_floating_point() else t for t in make_tasks()]
    batch = _batch_of(tasks)
    shared = torch.nn.Linear(4, adapter.num_params).double()
    p = torch.randn(len(batch), 4, dtype=torch.double, requires_grad=True)
    buckets = [
        (slice(0, 2), batch.examples("support", slice(0, 2))),
        (slice(2, 5), batch.examples("support", slice(2, 5))),
    ]  # noqa: E501
    loss = BucketedLoss(shared, adapter, buckets)
    whole = task_losses(adapter(shared(p), *tasks[:1], tasks[-1]), tasks[1], tasks[2])
    (ref,) = torch.autograd.grad(whole.sum(), p, create_graph=True)
    values, grad = loss.value_and_grad(p, create_graph=True)
    torch.testing.assert_close(values, whole.detach())
    torch.testing.assert_close(grad, ref)
    # second order: the gradient of a function of the gradient agrees too
    (h_ref,) = torch.autograd.grad(ref.pow(2).sum(), shared.weight)
    (h,) = torch.autograd.grad(grad.pow(2).sum(), shared.weight)
    torch.testing.assert_close(h, h_ref)


def test_examples_gather_unpacked_masks_and_the_all_split():
    tasks = make_tasks()
    batch = _batch_of(tasks)
    mask = batch.support_mask.clone()
    mask[:, 0] = False  # not front-packed any more
    b = TaskBatch(**{**vars(batch), "support_mask": mask})
    ex = b.examples("support", torch.tensor([2, 0]))
    for row, t in enumerate([2, 0]):
        n = int(mask[t].sum())
        assert int(ex.mask[row].sum()) == n
        torch.testing.assert_close(ex.x[row, :n], batch.support_x[t][mask[t]])
    assert ex.x.shape[1] == int(mask[[2, 0]].sum(1).max())
    both = batch.examples("all", slice(1, 3))
    for row, t in enumerate([1, 2]):
        xs = torch.cat([batch.support_x[t][batch.support_mask[t]], batch.query_x[t][batch.query_mask[t]]])
        torch.testing.assert_close(both.x[row][both.mask[row]], xs)


def test_under_a_cpu_autocast_the_inner_gradient_is_autograd_s_and_losses_stay_float32():
    """Under a CPU bf16 autocast the adapter's products run in bf16 through autograd (the hand-written
    gradient is float32-only: ``torch.is_autocast_enabled()`` alone looks at CUDA and would miss it); the
    losses are float32 and equal those of the same autocast pass over the whole batch."""
    from meta_vqa.meta.maml import _by_hand

    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    tasks = make_tasks()
    batch = _batch_of(tasks)
    shared = torch.nn.Linear(4, adapter.num_params)
    p = torch.randn(len(batch), 4, requires_grad=True)
    buckets = [
        (slice(0, 2), batch.examples("support", slice(0, 2))),
        (slice(2, 5), batch.examples("support", slice(2, 5))),
    ]  # noqa: E501
    cpu = torch.device("cpu")
    assert _by_hand(adapter, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _by_hand(adapter, cpu)
        values, grad = BucketedLoss(shared, adapter, buckets).value_and_grad(p)
        whole = task_losses(adapter(shared(p), *tasks[:1], tasks[-1]), tasks[1], tasks[2])
        (ref,) = torch.autograd.grad(whole.sum(), p)
    assert values.dtype == torch.float32 and whole.dtype == torch.float32
    torch.testing.assert_close(values, whole.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    # and the bf16 values are those of the float32 computation up to bf16 rounding
    exact = task_losses(adapter(shared(p), *tasks[:1], tasks[-1]), tasks[1], tasks[2])
    torch.testing.assert_close(values, exact.detach(), rtol=0.05, atol=0.05)


def test_meta_gradient_under_autocast_scores_the_outer_loss_in_float32():
    """bf16 hypernetwork weights: the outer losses and their gradient with respect to the weights are
    float32 (the weights upcast, autocast off, the hand-written gradient: a bf16/fp16 gradient would be
    rounded before a 16-mixed scaler scales it), so is the scalar handed to ``backward``; the meta-gradient
    is the float32 one up to bf16 rounding."""
    from meta_vqa.meta.maml import outer_grad

    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    tasks = make_tasks()
    batch = _batch_of(tasks)
    shared = torch.nn.Linear(4, adapter.num_params)
    z0 = torch.nn.Parameter(0.1 * torch.randn(4))
    seen = []

    def backward(loss):
        seen.append(loss.dtype)
        loss.backward()

    def run():
        shared.zero_grad()
        z0.grad = None
        stats = meta_gradient(
            batch,
            lambda b: z0.expand(len(b), -1),
            shared,
            adapter,
            InnerLoop(2, 0.1),
            "support",
            "query",
            backward,
        )  # noqa: E501
        return stats, shared.weight.grad.clone(), z0.grad.clone()

    s32, gw32, gz32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16, gw16, gz16 = run()
        w16 = shared(z0.detach().expand(len(batch), -1))
        out = outer_grad(batch, w16.detach(), adapter, "query", Budget())
    assert (
        w16.dtype == torch.bfloat16 and out.grad.dtype == torch.float32 and out.losses.dtype == torch.float32
    )
    ref = outer_grad(batch, w16.detach().float(), adapter, "query", Budget())  # the same in float32 outright
    torch.testing.assert_close(out.grad, ref.grad)
    assert seen[-1] == torch.float32 and s16.loss.dtype == torch.float32
    torch.testing.assert_close(s16.loss, s32.loss, rtol=0.02, atol=0.02)
    for a, b in ((gw16, gw32), (gz16, gz32)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("budget", [Budget(None), Budget(None, max_padding=1.0)])
def test_outer_gradient_through_autograd_fills_every_row(budget, monkeypatch):
    """Float32 weights under a CPU autocast (the base variants' own weights in bf16-mixed) take autograd's
    path through :func:`outer_grad`: every bucket's gradient lands in its rows, whether the bucket's rows are
    one range (a slice) or scattered, and equals the float32 gradient up to bf16 rounding. The result
    buffer starts as NaN here, so a row that is not written shows."""
    from meta_vqa.meta.maml import outer_grad

    torch.manual_seed(0)
    adapter = ResidualAdapter(DIM, HIDDEN)
    batch = _batch_of(make_tasks())
    w = 0.3 * torch.randn(len(batch), adapter.num_params)
    ref = outer_grad(batch, w, adapter, "query", budget)  # float32, by hand
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: real_empty_like(t, **k).fill_(float("nan")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = outer_grad(batch, w, adapter, "query", budget)
    assert torch.isfinite(out.grad).all()
    torch.testing.assert_close(out.losses, ref.losses, rtol=0.05, atol=0.05)
    assert F.cosine_similarity(out.grad, ref.grad, dim=1).min() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 1024.0, 3.7])
def test_carry_grad_gives_the_gradient_of_the_elementwise_sum_bit_for_bit(dtype, scale):
    """The scalar that carries a group's ∂L/∂w back through the hypernetwork: the same gradient, bit for
    bit, as autograd's ``(w * g).sum()``, unscaled or scaled like a loss by a gradient scaler, for float32
    and half-precision (autocast) weights; its value is Σ w·g."""
    from meta_vqa.meta.maml import carry_grad

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 8, generator=gen)
    proj = torch.randn(8, 1000, generator=gen)
    g = torch.randn(6, 1000, generator=gen) * 1e-3
    grads, values = [], []
    for carry in (lambda w: (w * g).sum(dtype=torch.float32), lambda w: carry_grad(w, g)):
        leaf = p.clone().requires_grad_()
        w = (leaf @ proj).to(dtype)  # the weights of a group, with a graph to the meta-parameters
        value = carry(w)
        (value if scale is None else value * scale).backward()
        grads.append(leaf.grad)
        values.append(value.detach())
    assert torch.equal(grads[0], grads[1])
    assert values[1].dtype == torch.float32
    assert torch.allclose(values[0], values[1], rtol=1e-4, atol=1e-6)
