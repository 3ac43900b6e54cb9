"""Bench: HyperCLIP guidance of the test tasks at paper scale, planned vs per task and control.

Ours: :meth:`HyperCLIPStage.guided_controls` on all test tasks at once: the three controls (aligned,
shuffled, empty) stacked along the task axis, one Adam optimisation of ``[3·T, latent]`` latents, the
HNet's output layer folded into the encoder's first layer (:meth:`HyperCLIPStage.latent_encoder`).

Baselines, on the same stage (a random HNet generator and a random encoder: the cost does not depend on
the weights): the unfused path ``H_ω(G(z))`` (every step reads the HNet's and the encoder's 394,240-wide
matrices twice) run (a) per task and control, the per-task loop, timed on ``--baseline-rows`` rows and
scaled to all 3·T rows; (b) as the test step did before: batches of ``--batch`` tasks, the controls one
after another, timed on one batch and control and scaled. Scaled figures say so in their config.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from meta_vqa.bench import PeakMemory, Work, figure, measure_limits, memory_note, resolve_device, roofline
from meta_vqa.data.batch import TaskBatch
from meta_vqa.diffusion.guidance import optimize_latents
from meta_vqa.stages.guidance import control_questions
from meta_vqa.stages.hyperclip import HyperCLIPStage


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=373, help="test tasks (Meta-VQA: 373)")
    p.add_argument("--steps", type=int, default=50, help="guidance steps (Adam)")
    p.add_argument("--dim", type=int, default=768, help="CLIP feature width (768: D = 394,240)")
    p.add_argument("--hidden", type=int, default=256, help="adapter hidden width")
    p.add_argument("--latent", type=int, default=128, help="latent size")
    p.add_argument("--hnet-hidden", type=int, nargs="+", default=[128, 128, 128], help="HNet hidden widths")
    p.add_argument("--encoder-hidden", type=int, nargs="+", default=[128, 128], help="encoder hidden widths")
    p.add_argument("--batch", type=int, default=32, help="test batch of the previous path (eval_batch_size)")
    p.add_argument("--baseline-rows", type=int, default=3, help="rows timed one by one for the per-task loop")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--seed", type=int, default=0)


def test_tasks(n: int, dim: int, qdim: int, device: torch.device, seed: int) -> TaskBatch:
    """``n`` tasks with random question embeddings; guidance reads nothing else."""
    g = torch.Generator().manual_seed(seed)
    one = torch.zeros(n, 1, dtype=torch.bool)
    batch = TaskBatch(
        task=torch.arange(n),
        question=torch.randn(n, qdim, generator=g),
        answers=torch.zeros(n, 1, dim),
        answer_mask=~one,
        support_x=torch.zeros(n, 1, dim),
        support_y=torch.zeros(n, 1, dtype=torch.long),
        support_mask=one,
        query_x=torch.zeros(n, 1, dim),
        query_y=torch.zeros(n, 1, dtype=torch.long),
        query_mask=one,
    )
    return TaskBatch(**{k: v.to(device) for k, v in vars(batch).items()})


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    hnet = {
        "feature_dim": args.dim,
        "question_dim": args.dim,
        "adapter_hidden": args.hidden,
        "latent_dim": args.latent,
        "hnet_hidden": list(args.hnet_hidden),
    }
    stage = HyperCLIPStage(
        upstream={"class_path": "meta_vqa.stages.hnet.HNetStage", "hparams": hnet},
        feature_dim=args.dim,
        question_dim=args.dim,
        hidden=tuple(args.encoder_hidden),
        guidance_steps=args.steps,
    ).to(device)
    stage.eval()
    gen, hp = stage.generator, stage.hparams
    batch = test_tasks(args.tasks, args.dim, args.dim, device, args.seed)
    T, C = len(batch), len(hp.controls)
    questions = torch.cat([control_questions(batch, c) for c in hp.controls])
    tasks = batch.task.repeat(C)

    def unfused(rows: slice) -> torch.Tensor:
        """The previous path: G(z) then H_ω every step, for the rows ``rows`` of the stacked problem."""
        z_init = gen.init_latents(tasks[rows]).detach()
        q = questions[rows]
        score = lambda z: stage.similarity(gen.weights(z), q)  # noqa: E731
        return optimize_latents(z_init, score, hp.guidance_steps, hp.guidance_lr, hp.guidance_prior)

    limits = measure_limits(device)
    with PeakMemory(device) as mem:  # one call for the memory, one timed (no sampler running: timed_peak)
        ours = torch.cat(list(stage.guided_controls(batch).values()))
    t0 = time.perf_counter()
    stage.guided_controls(batch)
    t_ours = time.perf_counter() - t0
    sample = [round(i * (C * T - 1) / max(args.baseline_rows - 1, 1)) for i in range(args.baseline_rows)]
    t0 = time.perf_counter()
    loop = torch.cat([unfused(slice(r, r + 1)) for r in sample])
    t_row = (time.perf_counter() - t0) / len(sample)
    b = min(args.batch, T)
    t0 = time.perf_counter()
    prev = unfused(slice(0, b))
    t_prev_batch = time.perf_counter() - t0
    t_loop, t_prev = t_row * C * T, t_prev_batch * C * T / b
    diff = max((ours[sample] - loop).abs().max().item(), (ours[:b] - prev).abs().max().item())

    out_layer = gen.hnet.layers[-1]
    matrix = out_layer.weight.numel() * out_layer.weight.element_size()
    first = stage.encoder.mlp.layers[0]
    enc_matrix = first.weight.numel() * first.weight.element_size()
    D, r = out_layer.weight.shape
    rows = C * T
    small = 2 * sum(lay.weight.numel() for lay in [*gen.hnet.layers[:-1], *stage.encoder.mlp.layers[1:]])
    ours_flops = 2.0 * first.weight.shape[0] * D * r + 3.0 * rows * args.steps * (small + 2 * r * r)
    loop_flops = rows * args.steps * (4 * 2.0 * D * r + 3.0 * small)
    works = (
        Work(rows, matrix + enc_matrix, ours_flops),  # the fold reads both matrices once
        Work(rows, rows * args.steps * 2 * (matrix + enc_matrix), loop_flops),  # fwd + bwd, both, per step
    )
    config = {
        "tasks": T,
        "controls": list(hp.controls),
        "rows": rows,
        "steps": args.steps,
        "adapter_params": D,
        "latent": args.latent,
        "baseline": f"per task and control, unfused; timed on {len(sample)} rows, scaled to {rows}",
        "max_abs_latent_diff": diff,
    }
    prev_cfg = {
        **config,
        "baseline": f"the previous test step: batches of {b} tasks, controls one after another, unfused; "
        f"timed on one batch and control, scaled to {math.ceil(T / b)} batches × {C} controls",
    }
    out = [
        figure("guidance", "wall_s", t_ours, "s", t_loop, t_loop / t_ours, device, config),
        figure("guidance", "wall_s_vs_previous", t_ours, "s", t_prev, t_prev / t_ours, device, prev_cfg),
        *roofline("guidance", "guidance", works[0], t_ours, works[1], t_loop, limits, device, config),
    ]
    if mem.mib is not None:
        cfg = {"rows": rows, "measure": memory_note(device)}
        out.append(figure("guidance", "peak_memory", mem.mib, "MiB", None, None, device, cfg))
    return out
