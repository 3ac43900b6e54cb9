"""Evaluation protocol: k-shot subsets, majority and chance against hand computations."""

import torch

from meta_vqa.data.batch import TaskBatch, pack
from meta_vqa.eval.protocol import Protocol, kshot_masks, majority_correct, rank_within_answer
from meta_vqa.eval.results import ResultCollector, aggregate, render_markdown
from meta_vqa.meta.maml import InnerLoop, adapt
from meta_vqa.nets.adapter import ResidualAdapter, task_correct, task_losses


def _batch(support_y, query_y, k=3, dim=4, task=(0,)):
    S, Q = len(support_y[0]), len(query_y[0])
    B = len(support_y)
    return TaskBatch(
        task=torch.tensor(task),
        question=torch.zeros(B, dim),
        answers=torch.randn(B, k, dim),
        answer_mask=torch.ones(B, k, dtype=torch.bool),
        support_x=torch.randn(B, S, dim),
        support_y=torch.tensor(support_y),
        support_mask=torch.ones(B, S, dtype=torch.bool),
        query_x=torch.randn(B, Q, dim),
        query_y=torch.tensor(query_y),
        query_mask=torch.ones(B, Q, dtype=torch.bool),
    )


def test_rank_within_answer_by_hand():
    labels = torch.tensor([[1, 0, 1, 0, 1]])
    keys = torch.tensor([[0.5, 0.9, 0.1, 0.2, 0.7]])
    mask = torch.tensor([[True, True, True, True, False]])
    rank = rank_within_answer(labels, mask, keys)
    # label 1: keys 0.5 (pos 0), 0.1 (pos 2) -> ranks 1, 0; label 0: 0.9 (pos 1), 0.2 (pos 3) -> 1, 0
    assert rank[0, :4].tolist() == [1, 1, 0, 0]
    assert rank[0, 4] > 4


def test_kshot_filters_answers_with_too_few_examples():
    # answer 0: 3 support examples, answer 1: 3, answer 2: 1 -> with max_k = 2 answer 2 is dropped
    b = _batch([[0, 0, 0, 1, 1, 1, 2]], [[0, 1, 2, 2]])
    s, q, eligible = kshot_masks(b, k=1, max_k=2, seed=0)
    assert eligible.tolist() == [True]
    assert s[0].sum() == 2 and s[0, 6].item() is False
    assert sorted(b.support_y[0][s[0]].tolist()) == [0, 1]
    assert q[0].tolist() == [True, True, False, False]
    s2, _, _ = kshot_masks(b, k=2, max_k=2, seed=0)
    assert s2[0].sum() == 4 and (s2 | ~s)[0].all()  # the 2-shot set contains the 1-shot set
    assert torch.equal(kshot_masks(b, 1, 2, seed=0)[0], s)  # seeded
    # a task with fewer than two kept answers does not take part
    b1 = _batch([[0, 0, 0, 1]], [[0, 1]])
    assert kshot_masks(b1, 1, 2, seed=0)[2].tolist() == [False]


def test_majority_takes_the_first_most_frequent_answer():
    b = _batch([[1, 1, 0, 0, 2]], [[0, 1, 0, 2]])
    assert majority_correct(b, b.support_mask, b.query_mask).tolist() == [2]  # tie 0/1 -> answer 0


def test_protocol_results_and_records():
    torch.manual_seed(0)
    adapter = ResidualAdapter(4, 3)
    b = _batch([[0, 0, 1, 1], [0, 1, 1, 1]], [[0, 1, 1], [1, 0, 1]], k=2, task=(5, 9))
    proto = Protocol(InnerLoop(steps=2, lr=0.1), max_shots=1, seed=3)
    res = proto.evaluate(adapter, b, torch.zeros(2, adapter.num_params))
    assert set(res["model"]) == {0, "full", 1}
    assert res["chance"][0].correct.tolist() == [1.5, 1.5]
    col = ResultCollector()
    col.add("clip_zero_shot", b.task, res["model"])
    col.add("majority", b.task, res["majority"])
    recs = col.records("random", seed=0)
    z = next(r for r in recs if r["method"] == "clip_zero_shot" and r["shots"] == 0)
    hits = res["model"][0].correct.double()
    assert abs(z["accuracy"] - 100 * (hits / 3).mean().item()) < 1e-9
    assert abs(z["accuracy_pooled"] - 100 * hits.sum().item() / 6) < 1e-9 and z["n_tasks"] == 2
    m = next(r for r in recs if r["method"] == "majority" and r["shots"] == "full")
    assert abs(m["accuracy"] - 100 * (1 / 3 + 2 / 3) / 2) < 1e-9


def test_pack_keeps_the_masked_examples_in_order():
    x = torch.arange(10.0).reshape(2, 5, 1)
    y = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    px, py, pm = pack(x, y, mask)
    assert px.shape == (2, 3, 1)
    assert px[0, :, 0].tolist() == [1.0, 3.0, 4.0] and py[0].tolist() == [1, 0, 1] and pm[0].all()
    assert px[1, 0, 0].item() == 5.0 and pm[1].tolist() == [True, False, False]


def test_kshot_fine_tuning_on_the_packed_support_equals_the_masked_one():
    torch.manual_seed(1)
    adapter = ResidualAdapter(4, 3)
    b = _batch(
        [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [2, 1, 0, 2, 1, 0, 2, 1, 0, 0]], [[0, 1, 2], [2, 1, 0]], task=(1, 2)
    )
    loop = InnerLoop(steps=3, lr=0.5)
    init = 0.1 * torch.randn(2, adapter.num_params)
    res = Protocol(loop, max_shots=3, seed=7).evaluate(adapter, b, init, shots=[2])
    smask, qmask, _ = kshot_masks(b, 2, 3, 7)

    def masked_loss(p):  # the whole padded support, the k-shot subset masked in
        return task_losses(adapter(p, b.support_x, b.answers, b.answer_mask), b.support_y, smask)

    px, py, pm = pack(b.support_x, b.support_y, smask)
    packed = task_losses(adapter(init, px, b.answers, b.answer_mask), py, pm)
    assert px.shape[1] == 6 and torch.allclose(packed, masked_loss(init), atol=1e-6)  # 2 shots x 3 answers
    p = adapt(init, masked_loss, loop, track_meta_grad=False)
    correct, _ = task_correct(adapter(p, b.query_x, b.answers, b.answer_mask), b.query_y, qmask)
    assert torch.equal(res["model"][2].correct, correct)


def test_aggregate_mean_and_std_over_seeds():
    recs = [
        {
            "method": "x",
            "split": "random",
            "shots": 0,
            "seed": s,
            "accuracy": a,
            "accuracy_pooled": a,
            "n_tasks": 3,
        }
        for s, a in ((0, 50.0), (1, 60.0), (2, 70.0))
    ]
    recs.append(dict(recs[0]))  # the same record written twice counts once
    (row,) = aggregate(recs)
    assert row["mean"] == 60.0 and abs(row["std"] - 10.0) < 1e-12 and row["seeds"] == 3
    assert "| x | 60.0 ± 10.0 |" in render_markdown(recs)
