"""Bench: HNet-MAML at paper scale, batched over tasks vs a per-task loop.

Two figures, each measured against the straightforward per-task loop in the same run on the same tasks:

* ``meta_train_tasks_per_s``: one meta-step (inner loop over the latent + outer backward to θ and z0)
  through the stage's own ``meta_gradient``; the baseline feeds the tasks one at a time, unpadded.
* ``adapted_latents_per_s``: the adaptation dataset's inner loop (10 SGD steps from z0 on each task's
  data) through ``HNetStage.support_latents``, batched vs one task per call.

Also the peak memory of each side (CUDA allocator, or resident-set growth on CPU). Task sizes are drawn like Meta-VQA's (:mod:`meta_vqa.bench.maml`).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from meta_vqa.bench import PeakMemory, figure, memory_note, resolve_device, timed
from meta_vqa.bench.maml import add_scale_arguments, draw_sizes, make_batch
from meta_vqa.device import autocast
from meta_vqa.meta.maml import InnerLoop
from meta_vqa.stages.hnet import HNetStage


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_scale_arguments(p, repeats=2)
    p.add_argument("--latent", type=int, default=128, help="latent size")
    p.add_argument("--hnet-hidden", type=int, nargs="+", default=[128, 128, 128], help="HNet hidden widths")


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    chunk = args.chunk_size or None
    stage = HNetStage(
        feature_dim=args.dim,
        question_dim=args.dim,
        adapter_hidden=args.hidden,
        latent_dim=args.latent,
        hnet_hidden=tuple(args.hnet_hidden),
        inner_steps=args.steps,
        first_order=not args.second_order,
        chunk_size=chunk,
    ).to(device)
    sizes = draw_sizes(args.tasks, np.random.default_rng(args.seed))
    batch = make_batch(sizes, args.dim, args.dim, device, args.seed)
    B = len(batch)
    singles = [batch.select(torch.tensor([i], device=device)) for i in range(B)]
    params = [p for p in stage.parameters() if p.requires_grad]

    def meta_grad(chunks) -> torch.Tensor:
        stage.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            stage.meta_gradient(chunks)
        return torch.cat([p.grad.flatten() for p in params])

    def batched() -> torch.Tensor:
        return meta_grad(batch.chunks(chunk))

    def per_task() -> torch.Tensor:
        return meta_grad(singles)

    loop = InnerLoop(args.steps, 0.1, True)

    def adapt_batched() -> torch.Tensor:
        with autocast(device, args.precision):
            return stage.support_latents(batch, loop)

    def adapt_per_task() -> torch.Tensor:
        with autocast(device, args.precision):
            return torch.cat([stage.support_latents(one, loop) for one in singles])

    g_b, g_l = batched(), per_task()
    grad_diff = ((g_b - g_l).abs().max() / g_l.abs().max().clamp(min=1e-12)).item()
    z_b, z_l = adapt_batched(), adapt_per_task()
    latent_diff = ((z_b - z_l).abs().max() / z_l.abs().max().clamp(min=1e-12)).item()

    # the per-task side first: on CPU the resident set, once grown, may not shrink again
    with PeakMemory(device) as m_l:
        t_l = timed(per_task, device, args.repeats)
    with PeakMemory(device) as m_b:
        t_b = timed(batched, device, args.repeats)
    with PeakMemory(device) as am_l:
        ta_l = timed(adapt_per_task, device, args.repeats)
    with PeakMemory(device) as am_b:
        ta_b = timed(adapt_batched, device, args.repeats)

    config = {
        "tasks": B,
        "inner_steps": args.steps,
        "first_order": not args.second_order,
        "adapter_params": stage.adapter.num_params,
        "latent": args.latent,
        "hnet_hidden": list(args.hnet_hidden),
        "hnet_params": sum(p.numel() for p in stage.hnet.parameters()),
        "chunk_size": args.chunk_size,
        "support_sizes": [s for s, _, _ in sizes],
        "query_sizes": [q for _, q, _ in sizes],
        "grad_rel_max_diff": grad_diff,
        "latent_rel_max_diff": latent_diff,
        "precision": args.precision,
        "repeats": args.repeats,
    }
    out = [
        figure("hnet", "meta_train_tasks_per_s", B / t_b, "tasks/s", B / t_l, t_l / t_b, device, config),
        figure("hnet", "adapted_latents_per_s", B / ta_b, "latents/s", B / ta_l, ta_l / ta_b, device, config),
    ]
    if m_b.mib is not None:
        small = {"tasks": B, "chunk_size": args.chunk_size, "measure": memory_note(device)}
        out.append(figure("hnet", "peak_memory_meta_train", m_b.mib, "MiB", m_l.mib, None, device, small))
        out.append(figure("hnet", "peak_memory_adaptation", am_b.mib, "MiB", am_l.mib, None, device, small))
    return out
