"""DDP semantics: two gloo processes with half of every batch make the optimiser steps of one process with
the whole batch (HNet-MAML, HyperCLIP, HyperLDM with its EMA), and write one adaptation dataset, every job
once, equal to the one-process dataset. Plus the pieces: shares, samplers, loss weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from meta_vqa.cli import main
from meta_vqa.data.adaptation import AdaptationRecipe, plan_jobs
from meta_vqa.data.batch import TaskIndexBatch, TaskItems
from meta_vqa.data.shards import (
    EvalBatches,
    JobChunks,
    TaskBatches,
    assign_jobs,
    eval_batch_index,
    share,
    share_sizes,
)
from meta_vqa.errors import ConfigError
from meta_vqa.stages.distributed import GlobalBatch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke"
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


# --- the pieces ---------------------------------------------------------------------------------------
def test_shares_are_contiguous_in_rank_order_and_cover_the_batch():
    for n in range(1, 12):
        for world in range(1, min(n, 5) + 1):
            rows = [i for r in range(world) for i in range(n)[share(n, r, world)]]
            assert rows == list(range(n))
            sizes = share_sizes(n, world)
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_one_process_task_batches_are_those_of_a_shuffled_dataloader():
    """The training loader of one process draws what DataLoader(shuffle=True) drew (make run unchanged)."""
    items = [{"task": i, "answers": [0], "support": [i], "support_y": [0], "query": [i], "query_y": [0]}
             for i in range(11)]  # fmt: skip
    torch.manual_seed(3)
    old = [b.task.tolist() for _ in range(2) for b in DataLoader(items, 4, shuffle=True,
                                                                 collate_fn=TaskIndexBatch.collate)]  # fmt: skip
    torch.manual_seed(3)
    loader = DataLoader(TaskItems(items), sampler=TaskBatches(11, 4), batch_size=None, collate_fn=lambda b: b)
    new = [b.task.tolist() for _ in range(2) for b in loader]
    assert new == old and len(loader) == 3


def test_ranks_take_shares_of_the_same_global_batches():
    torch.manual_seed(0)
    alone = list(TaskBatches(9, 4))
    ranks = []
    for r in range(2):
        torch.manual_seed(0)  # every rank seeded alike (no process group here: no broadcast needed)
        ranks.append(list(TaskBatches(9, 4, rank=r, world=2)))
    assert [a + b for a, b in zip(*ranks)] == alone
    assert ranks[1][-1] == []  # the last batch holds 1 task: rank 1's share is empty
    with pytest.raises(ConfigError, match="data.batch_size"):
        TaskBatches(9, 1, rank=0, world=2)


def test_evaluation_batches_are_one_processs_dealt_to_the_ranks():
    alone = list(EvalBatches(5, 2))
    assert alone == [[0, 1], [2, 3], [4]]
    ranks = [list(EvalBatches(5, 2, r, 2)) for r in range(2)]
    assert ranks == [[[0, 1], [4]], [[2, 3], [2, 3]]]  # rank 1 repeats its batch: the same number of steps
    assert [eval_batch_index(i, 0, 2) for i in range(2)] == [0, 2]
    assert list(EvalBatches(1, 4, 1, 2)) == [[0]]  # no batch of its own: the last one again


def test_every_adaptation_job_belongs_to_one_rank_and_the_load_is_even():
    jobs = plan_jobs({"train": 9, "val": 2, "test": 5}, AdaptationRecipe(epochs=4))
    sizes = [len(j.items) for j in jobs]
    owner = assign_jobs(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(sizes)
    chunk_jobs = [j for j, s in enumerate(sizes) for _ in range(0, s, 4)]
    mine = [list(JobChunks(chunk_jobs, sizes, r, 2)) for r in range(2)]
    assert sorted(mine[0] + mine[1]) == list(range(len(chunk_jobs)))
    assert {chunk_jobs[c] for c in mine[0]}.isdisjoint({chunk_jobs[c] for c in mine[1]})


def test_weighted_rank_losses_average_to_the_global_mean():
    losses = torch.arange(7.0)
    sizes = share_sizes(7, 3)
    parts = losses.split(sizes)
    rows = [GlobalBatch(tuple(sizes), r) for r in range(3)]
    by_sum = sum(p.sum() / g.divisor for p, g in zip(parts, rows)) / 3  # DDP averages over ranks
    by_mean = sum(p.mean() * g.weight for p, g in zip(parts, rows)) / 3
    assert torch.allclose(by_sum, losses.mean()) and torch.allclose(by_mean, losses.mean())
    one = GlobalBatch((7,))
    assert one.weight == 1.0 and one.divisor == 7 and one.local(losses) is not None


# --- two processes against one ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(root: Path, hnet: Path, out: Path) -> list[list[str]]:
    """Few steps of each stage; batch sizes that split unevenly over 2 ranks (1 → 1+0, 3 → 2+1, 5 → 3+2,
    7 → 4+3)."""
    quiet = ["--data.root", str(root), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    # plain SGD: its steps are proportional to the gradient; Adam's first steps are about lr·sign(gradient)
    # and would not see a gradient off by a constant factor (a sum where a mean is due)
    sgd = [
        "--model.init_args.optimizer",
        "torch.optim.SGD",
        "--model.init_args.optimizer.init_args.lr",
        "0.1",
    ]
    adaptation = ["--data.adaptation", str(out / "adaptation"), "--model.init_args.upstream_ckpt", str(hnet)]
    return [
        # 9 tasks in batches of 4: the third holds 1 task, and rank 1 an empty share (a zero gradient)
        ["fit", "-c", str(SMOKE / "base.yaml"), *quiet, *sgd, "--stage_dir", str(out / "base"),
         "--trainer.max_steps", "4", "--data.batch_size", "4"],
        # a memory budget that fits one task per group: rank 0 runs two backward passes, rank 1 one
        ["fit", "-c", str(SMOKE / "hnet.yaml"), *quiet, *sgd, "--stage_dir", str(out / "hnet"),
         "--trainer.max_steps", "5", "--data.batch_size", "3", "--model.init_args.max_chunk_mib", "0.0001"],
        ["predict", "-c", str(SMOKE / "adapt.yaml"), *quiet[:2], "--stage_dir", str(out / "adaptation"),
         "--ckpt_path", str(hnet), "--trainer.enable_progress_bar", "false"],
        ["fit", "-c", str(SMOKE / "hyperclip.yaml"), *quiet, *sgd, *adaptation, "--stage_dir",
         str(out / "hyperclip"), "--trainer.max_steps", "4", "--data.batch_size", "5"],
        # then tested in batches of 2 (5 tasks: rank 0 evaluates batches 0 and 2, rank 1 batch 1 twice)
        ["fit", "-c", str(SMOKE / "hyperldm.yaml"), *quiet, *sgd, *adaptation, "--stage_dir",
         str(out / "hyperldm"), "--trainer.max_steps", "4", "--data.batch_size", "7", "--test_after_fit",
         "true", "--data.eval_batch_size", "2"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_and_two(smoke_hnet, tmp_path_factory):
    """The same commands by two DDP processes (launched first, in the background) and by this one."""
    work = tmp_path_factory.mktemp("ddp")
    root, hnet = smoke_hnet["root"], smoke_hnet["ckpt"]
    plan = work / "plan.json"
    plan.write_text(json.dumps([[*argv, *DDP] for argv in _commands(root, hnet, work / "two")]))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env |= {"NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    ranks = [
        subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(plan)], cwd=work,
                         env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for argv in _commands(root, hnet, work / "one"):
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    while any(p.poll() is None for p in ranks):  # a rank that fails leaves the other waiting: stop it
        if any(p.poll() for p in ranks) or time.time() - t0 > 900:
            for p in ranks:
                p.kill()
        time.sleep(0.5)
    for p in ranks:
        assert p.returncode == 0, p.stdout.read()[-4000:]
    return {"one": work / "one", "two": work / "two", "wall": time.time() - t0}


def _state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"] if "state_dict" in ckpt else ckpt


@pytest.mark.parametrize("stage", ["base", "hnet", "hyperclip", "hyperldm"])
def test_two_processes_with_half_batches_make_the_steps_of_one(one_and_two, stage):
    one = _state(one_and_two["one"] / stage / "last.ckpt")
    two = _state(one_and_two["two"] / stage / "last.ckpt")
    start = _state(one_and_two["two"] / stage / "initial.pt")
    assert one.keys() == two.keys()
    moved = max((one[k].float() - start[k].float()).abs().max().item() for k in one)
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert moved > 1e-3, "the steps changed nothing: the comparison would prove nothing"
    # float summation order only: at most 1e-4 of how far the SGD steps moved the weights (HyperCLIP's
    # logits, scaled by 100, amplify rounding most: 3.9e-5 of 0.85 measured); a gradient off by a factor
    # would be off by a fraction of `moved`
    assert diff < 1e-4 * moved, (stage, diff, moved)


def test_ddp_test_results_and_generated_latents_are_those_of_one_process(one_and_two):
    """HyperLDM samples per batch: each rank evaluates whole batches of one process with their seeds."""
    one, two = (
        json.loads((one_and_two[k] / "hyperldm" / "results.json").read_text()) for k in ("one", "two")
    )
    assert len(one) == len(two) > 10
    for a, b in zip(one, two):
        assert {k: a[k] for k in a if k != "accuracy"} == {k: b[k] for k in b if k != "accuracy"}
        assert abs(a["accuracy"] - b["accuracy"]) < 1e-9, (a, b)
    a, b = (load_file(str(one_and_two[k] / "hyperldm" / "latents.safetensors")) for k in ("one", "two"))
    order = b["generated_task"].argsort()
    assert torch.equal(a["generated_task"].sort().values, b["generated_task"][order])
    assert torch.allclose(a["generated"][a["generated_task"].argsort()], b["generated"][order], atol=1e-5)


def test_ddp_writes_one_adaptation_dataset_every_job_once(one_and_two):
    two = one_and_two["two"] / "adaptation"
    written = [(two / f"written_rank{r}.txt").read_text().split() for r in range(2)]
    jobs = [j.name for j in plan_jobs({"train": 9, "val": 2, "test": 5}, AdaptationRecipe(epochs=4))]
    assert all(written) and sorted(written[0] + written[1]) == sorted(jobs)  # both ranks, each job once
    assert not (two / "parts").exists()
    a = load_file(str(one_and_two["one"] / "adaptation" / "adaptation.safetensors"))
    b = load_file(str(two / "adaptation.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5), k
