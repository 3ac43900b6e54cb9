"""Bench: meta-training throughput of the batched MAML step vs a per-task loop, at paper scale.

Both sides run the stage's own code path (``BaseStage.meta_gradient``) on the same tasks;
the baseline feeds the tasks one at a time, unpadded, the way the authors' code did.
Task sizes are drawn like Meta-VQA's meta-train tasks (quantiles of the real task files).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from meta_vqa.bench import call_spread, calls_peak, figure, memory_note, resolve_device, timed
from meta_vqa.data.batch import TaskBatch
from meta_vqa.device import PRECISIONS, autocast
from meta_vqa.stages.base import BaseStage

# 0, 5, ..., 100th percentiles over the 870 meta-train tasks of Meta-VQA (support, query, answers)
SUPPORT_Q = [12, 15, 16, 17, 18, 20, 21, 22, 25, 26, 29, 33, 37, 41, 49, 59, 75, 93, 120, 205, 1242]
QUERY_Q = [5, 7, 7, 8, 8, 9, 10, 11, 11, 12, 13, 15, 17, 19, 22, 26, 33, 42, 54, 90, 534]
ANSWERS_Q = [2, 3, 4, 4, 5, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 11, 13, 16, 22, 203]


def draw_sizes(n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(support, query, answers) per task by inverse-CDF interpolation (support and query share u)."""
    grid = np.linspace(0, 1, len(SUPPORT_Q))
    u, v = rng.random(n), rng.random(n)
    s = np.interp(u, grid, SUPPORT_Q).round().astype(int)
    q = np.interp(u, grid, QUERY_Q).round().astype(int)
    k = np.interp(v, grid, ANSWERS_Q).round().astype(int)
    return [(int(a), int(b), int(min(c, a))) for a, b, c in zip(s, q, k)]


def make_batch(
    sizes: list[tuple[int, int, int]], dim: int, qdim: int, device: torch.device, seed: int
) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    S, Q, K = (max(x[i] for x in sizes) for i in range(3))

    def padded(n_max: int, counts: list[int]):
        return torch.arange(n_max).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)

    k_of = torch.tensor([x[2] for x in sizes]).unsqueeze(1)
    batch = TaskBatch(
        task=torch.arange(B),
        question=torch.randn(B, qdim, generator=g),
        answers=torch.randn(B, K, dim, generator=g),
        answer_mask=padded(K, [x[2] for x in sizes]),
        support_x=torch.randn(B, S, dim, generator=g) * 3,
        support_y=(torch.randint(0, 1 << 20, (B, S), generator=g) % k_of),
        support_mask=padded(S, [x[0] for x in sizes]),
        query_x=torch.randn(B, Q, dim, generator=g) * 3,
        query_y=(torch.randint(0, 1 << 20, (B, Q), generator=g) % k_of),
        query_mask=padded(Q, [x[1] for x in sizes]),
    )
    return TaskBatch(**{k: v.to(device) for k, v in vars(batch).items()})


def add_scale_arguments(p: argparse.ArgumentParser, repeats: int) -> None:
    """The paper-scale MAML settings shared by the ``maml`` and ``hnet`` benches."""
    p.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch / adaptation call")
    p.add_argument("--steps", type=int, default=10, help="inner steps")
    p.add_argument("--dim", type=int, default=768, help="CLIP feature width (768: D = 394,240)")
    p.add_argument("--hidden", type=int, default=256, help="adapter hidden width")
    p.add_argument(
        "--max-chunk-mib", type=float, default=1024.0, help="memory budget of one batched pass (0 = none)"
    )
    p.add_argument(
        "--chunk-size", type=int, default=0, help="deprecated: tasks per adapter bucket (0 = no cap)"
    )
    p.add_argument(
        "--compare-chunks",
        type=int,
        default=0,
        help="also time the previous path: chunks of this many tasks, each on its own (0 = skip)",
    )
    p.add_argument("--second-order", action="store_true", help="second-order MAML instead of first-order")
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls per side (median reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument(
        "--precision", default="fp32", choices=PRECISIONS, help="autocast of both sides (fp16: CUDA only)"
    )
    p.add_argument("--seed", type=int, default=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_scale_arguments(p, repeats=3)


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    stage = BaseStage(
        "mnet_maml",
        feature_dim=args.dim,
        question_dim=args.dim,
        adapter_hidden=args.hidden,
        inner_steps=args.steps,
        first_order=not args.second_order,
        max_chunk_mib=args.max_chunk_mib or None,
        chunk_size=args.chunk_size or None,
    ).to(device)
    sizes = draw_sizes(args.tasks, np.random.default_rng(args.seed))
    batch = make_batch(sizes, args.dim, args.dim, device, args.seed)
    B = len(batch)
    singles = [batch.select(torch.tensor([i], device=device)) for i in range(B)]

    def meta_grad(chunks) -> torch.Tensor:
        stage.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            stage.meta_gradient(chunks)
        return stage.w0.grad.clone()

    def batched() -> torch.Tensor:
        return meta_grad(batch)

    def per_task() -> torch.Tensor:
        return meta_grad(singles)

    g_batched, g_loop = batched(), per_task()
    grad_diff = (g_batched - g_loop).abs().max().item() / max(g_loop.abs().max().item(), 1e-12)
    calls_loop, peak_loop = calls_peak(per_task, device, args.repeats)  # the per-task side first (PeakMemory)
    calls_batched, peak_batched = calls_peak(batched, device, args.repeats)
    t_loop, t_batched = statistics.median(calls_loop), statistics.median(calls_batched)
    chunks = batch.chunks(args.compare_chunks) if args.compare_chunks else None
    t_chunks = timed(lambda: meta_grad(chunks), device, args.repeats) if chunks else None
    config = {
        "tasks": B,
        "inner_steps": args.steps,
        "first_order": not args.second_order,
        "adapter_params": stage.adapter.num_params,
        "max_chunk_mib": args.max_chunk_mib,
        "chunk_size": args.chunk_size,
        "support_sizes": [s for s, _, _ in sizes],
        "query_sizes": [q for _, q, _ in sizes],
        "grad_rel_max_diff": grad_diff,
        "precision": args.precision,
        "repeats": args.repeats,
    }
    out = [
        figure(
            "maml",
            "meta_train_tasks_per_s",
            B / t_batched,
            "tasks/s",
            B / t_loop,
            t_loop / t_batched,
            device,
            {**config, **call_spread({"ours": calls_batched, "baseline": calls_loop}, B)},
        )
    ]
    if t_chunks is not None:
        cfg = {**config, "baseline": f"chunks of {args.compare_chunks} tasks (the previous path)"}
        rate = B / t_batched
        out.append(
            figure(
                "maml",
                "meta_train_tasks_per_s_vs_chunks",
                rate,
                "tasks/s",
                B / t_chunks,
                t_chunks / t_batched,
                device,
                cfg,
            )
        )  # noqa: E501
    if peak_batched is not None:
        out.append(
            figure(
                "maml",
                "peak_memory",
                peak_batched,
                "MiB",
                peak_loop,
                None,
                device,
                {"tasks": B, "max_chunk_mib": args.max_chunk_mib, "measure": memory_note(device)},
            )
        )
    return out
