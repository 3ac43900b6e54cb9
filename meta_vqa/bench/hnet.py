"""Bench: HNet-MAML at paper scale, planned over tasks vs a per-task loop.

Two throughputs, each measured against the straightforward per-task loop in the same run on the same tasks:

* ``meta_train_tasks_per_s``: one meta-step (inner loop over the latent + outer backward to θ and z0)
  through the stage's own ``meta_gradient``; the baseline feeds the tasks one at a time, unpadded.
* ``adapted_latents_per_s``: the adaptation dataset's inner loop (10 SGD steps from z0 on each task's
  data) through ``HNetStage.support_latents``, planned vs one task per call.

Beside each: the shared weights read per task (the HNet's output layer, 128 × D floats, once per pass),
the achieved fractions of this machine's memory bandwidth and matmul peak (measured in the same run),
and the peak memory of each side (CUDA allocator; on CPU the growth of what the process holds from
``malloc``). ``--compare-chunks N`` also times the previous path (chunks of N tasks, each through the shared
layers on its own). Task sizes are drawn like Meta-VQA's (:mod:`meta_vqa.bench.maml`). The meta-train side
is timed without copying out its gradient (the copy is for the comparison with the loop, not training's).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import numpy as np
import torch
from torch.autograd.graph import increment_version

from meta_vqa.bench import (
    Work,
    call_spread,
    calls_peak,
    figure,
    measure_limits,
    memory_note,
    resolve_device,
    roofline,
)
from meta_vqa.bench.maml import add_scale_arguments, draw_sizes, make_batch
from meta_vqa.device import autocast
from meta_vqa.meta.maml import InnerLoop, adapt_tasks, plan_tasks
from meta_vqa.nets import packed
from meta_vqa.stages.hnet import HNetStage


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_scale_arguments(p, repeats=3)
    p.add_argument("--latent", type=int, default=128, help="latent size")
    p.add_argument("--hnet-hidden", type=int, nargs="+", default=[128, 128, 128], help="HNet hidden widths")


def adapter_flops(examples: float, dim: int, hidden: int, backward: bool = True) -> float:
    """FLOPs of the adapter's two products on ``examples`` examples (×2.5 with the backward pass: the
    gradients with respect to the hidden layer and to both weight matrices)."""
    fwd = 4.0 * dim * hidden * examples
    return fwd * (2.5 if backward else 1.0)


def shared_work(tasks: int, groups: int, passes: int, stage: HNetStage) -> tuple[float, float]:
    """``(bytes read, FLOPs)`` of ``passes`` passes through the HNet's output layer for each of ``groups``
    groups holding ``tasks`` tasks in all."""
    out = stage.hnet.layers[-1]
    matrix = out.weight.numel() * out.weight.element_size()
    return groups * passes * matrix, passes * tasks * 2.0 * out.weight.numel()


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    stage = HNetStage(
        feature_dim=args.dim,
        question_dim=args.dim,
        adapter_hidden=args.hidden,
        latent_dim=args.latent,
        hnet_hidden=tuple(args.hnet_hidden),
        inner_steps=args.steps,
        first_order=not args.second_order,
        max_chunk_mib=args.max_chunk_mib or None,
        chunk_size=args.chunk_size or None,
    ).to(device)
    budget = stage.budget
    sizes = draw_sizes(args.tasks, np.random.default_rng(args.seed))
    batch = make_batch(sizes, args.dim, args.dim, device, args.seed)
    B = len(batch)
    singles = [batch.select(torch.tensor([i], device=device)) for i in range(B)]
    params = [p for p in stage.parameters() if p.requires_grad]
    loop = InnerLoop(args.steps, 0.1, True)

    def meta_grad(tasks, collect: bool = True) -> torch.Tensor | None:
        """One meta-gradient; ``collect``: also return it flat (for the comparison, not the timing: the
        copy of 50 M gradients is the bench's, not training's). The output layer's weight is marked as
        changed first, as training's optimizer step changes it: its packed copy is made again in every
        timed call, as in every training step."""
        stage.zero_grad(set_to_none=True)
        increment_version(stage.hnet.layers[-1].weight)
        with autocast(device, args.precision):
            stage.meta_gradient(tasks)
        return torch.cat([p.grad.flatten() for p in params]) if collect else None

    def adapt_latents(tasks) -> torch.Tensor:
        with autocast(device, args.precision):
            return torch.cat([stage.support_latents(t, loop) for t in tasks])

    sides = {
        "meta": {
            "ours": lambda collect=True: meta_grad(batch, collect),
            "loop": lambda collect=True: meta_grad(singles, collect),
        },
        "adapt": {
            "ours": lambda: adapt_latents([batch]),
            "loop": lambda: adapt_latents(singles),
        },
    }
    if args.compare_chunks:
        chunks = batch.chunks(args.compare_chunks)
        parts = batch.chunked(args.compare_chunks, by="support")

        def adapt_chunked() -> torch.Tensor:
            out = torch.empty(B, stage.latent_dim, device=device)
            for idx, chunk in parts:
                init = stage.init_latents(chunk.task)
                out[idx] = adapt_tasks([chunk], [init], stage.adapter, loop, stage.weights, budget=budget)[0]
            return out

        sides["meta"]["chunks"] = lambda collect=True: meta_grad(chunks, collect)
        sides["adapt"]["chunks"] = adapt_chunked

    diffs = {}
    for key, fns in sides.items():
        ref = fns["loop"]()
        for name, fn in fns.items():
            if name != "loop":
                got = fn()
                diffs[f"{key}_{name}"] = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()

    limits = measure_limits(device)
    times, calls, peaks = {}, {}, {}
    for key, fns in sides.items():  # the per-task side first
        for name in ("loop", *(n for n in fns if n != "loop")):
            fn = functools.partial(fns[name], collect=False) if key == "meta" else fns[name]
            calls[key, name], peaks[key, name] = calls_peak(fn, device, args.repeats)
            times[key, name] = statistics.median(calls[key, name])

    out_layer = stage.hnet.layers[-1]
    with autocast(device, args.precision):
        packs = isinstance(out_layer, packed.PackedLinear) and out_layer.packs(stage.z0[None].detach())
    s = torch.tensor([x[0] for x in sizes], dtype=torch.float64)
    q = torch.tensor([x[1] for x in sizes], dtype=torch.float64)
    dtype = batch.answers.dtype
    n_meta = len(plan_tasks([batch], stage.hparams.inner_split, stage.adapter, budget, dtype)[1])
    n_adapt = len(plan_tasks([batch], "support", stage.adapter, budget, dtype)[1])
    meta_passes, adapt_passes = 2 * args.steps + 3, 2 * args.steps  # + outer fwd, bwd to input and weight
    meta_flops = adapter_flops(args.steps * s.sum() + q.sum(), args.dim, args.hidden)
    adapt_flops = adapter_flops(args.steps * s.sum(), args.dim, args.hidden)

    def work(groups: int, passes: int, flops: float) -> Work:
        read, shared_flops = shared_work(B, groups, passes, stage)
        return Work(B, read, float(shared_flops + flops))

    works = {
        ("meta", "ours"): work(n_meta, meta_passes, meta_flops),
        ("meta", "loop"): work(B, meta_passes, meta_flops),
        ("adapt", "ours"): work(n_adapt, adapt_passes, adapt_flops),
        ("adapt", "loop"): work(B, adapt_passes, adapt_flops),
    }
    config = {
        "tasks": B,
        "inner_steps": args.steps,
        "first_order": not args.second_order,
        "adapter_params": stage.adapter.num_params,
        "latent": args.latent,
        "hnet_hidden": list(args.hnet_hidden),
        "hnet_params": sum(p.numel() for p in stage.hnet.parameters()),
        "max_chunk_mib": args.max_chunk_mib,
        "chunk_size": args.chunk_size,
        "groups_meta_train": n_meta,
        "groups_adaptation": n_adapt,
        "support_sizes": [x[0] for x in sizes],
        "query_sizes": [x[1] for x in sizes],
        "rel_max_diff_vs_loop": diffs,
        "precision": args.precision,
        "repeats": args.repeats,
        "packed_output_layer": packs,
    }
    names = {"meta": ("meta_train", "tasks/s"), "adapt": ("adapted_latents", "latents/s")}
    out = []
    for key, (name, unit) in names.items():
        t_o, t_l = times[key, "ours"], times[key, "loop"]
        spread = call_spread({"ours": calls[key, "ours"], "baseline": calls[key, "loop"]}, B)
        rate_cfg = {**config, **spread}
        out.append(figure("hnet", f"{name}_per_s", B / t_o, unit, B / t_l, t_l / t_o, device, rate_cfg))
        if (key, "chunks") in times:
            t_c = times[key, "chunks"]
            cfg = {**config, "baseline": f"chunks of {args.compare_chunks} tasks (the previous path)"}
            out.append(
                figure("hnet", f"{name}_per_s_vs_chunks", B / t_o, unit, B / t_c, t_c / t_o, device, cfg)
            )
        out += roofline(
            "hnet", name, works[key, "ours"], t_o, works[key, "loop"], t_l, limits, device, config
        )
    if peaks["meta", "ours"] is not None:
        small = {"tasks": B, "max_chunk_mib": args.max_chunk_mib, "measure": memory_note(device)}
        for key, name in (("meta", "meta_train"), ("adapt", "adaptation")):
            if (key, "chunks") in peaks:
                small = {**small, f"{name}_chunks_MiB": peaks[key, "chunks"]}
            out.append(
                figure(
                    "hnet",
                    f"peak_memory_{name}",
                    peaks[key, "ours"],
                    "MiB",
                    peaks[key, "loop"],
                    None,
                    device,
                    small,
                )
            )  # noqa: E501
    return out
