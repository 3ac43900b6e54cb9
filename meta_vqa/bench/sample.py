"""Bench: zero-shot weights for every meta-test task from a trained HyperLDM, DDPM-1000 vs few-step samplers.

The baseline is the paper's ancestral DDPM with all T steps; DDIM and DPM-Solver run k steps on the same
checkpoint, the same tasks and the same seed. Reports the wall-time ratio and the zero-shot accuracy of
each sampler (accuracy figures carry both values and no ratio).
"""

from __future__ import annotations

import argparse

from meta_vqa.bench import figure, resolve_device, timed
from meta_vqa.data.datamodule import MetaVQADataModule
from meta_vqa.errors import MetaVQAError
from meta_vqa.stages.checkpoints import check_stage, read_checkpoint
from meta_vqa.stages.handoff import class_path
from meta_vqa.stages.hyperldm import HyperLDMStage


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, help="a HyperLDM checkpoint (meta-vqa fit -c conf/.../hyperldm.yaml)"
    )
    p.add_argument(
        "--data-root", default=None, help="dataset folder (default: the one the checkpoint was trained on)"
    )
    p.add_argument("--split", default=None, help="task split (default: the checkpoint's)")
    p.add_argument("--gamma", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, default=20)
    p.add_argument(
        "--clip-x0",
        type=float,
        default=None,
        help="clamp x0 estimates of DDPM and DDIM (default: the model's)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    path, ckpt = read_checkpoint(args.ckpt, "--ckpt")
    check_stage(path, ckpt, [class_path(HyperLDMStage)], "--ckpt")
    data_hp = ckpt.get("datamodule_hyper_parameters", {})
    root = args.data_root or data_hp.get("root")
    if root is None:
        raise MetaVQAError(f"{path}: no dataset recorded; pass --data-root")
    model = HyperLDMStage.load_from_checkpoint(path, map_location=device, weights_only=True).eval()
    dm = MetaVQADataModule(
        root,
        split=args.split or data_hp.get("split", "random"),
        val_fraction=data_hp.get("val_fraction", 0.1),
        val_seed=data_hp.get("val_seed", 0),
    )
    batch = dm.to_batch(next(iter(dm.loader("test", batch_size=len(dm.test_tasks)))), device)
    runs = {"ddpm": 1000, "ddim": args.ddim_steps, "dpm": args.dpm_steps}
    latents, seconds = {}, {}
    for kind, steps in runs.items():

        def go(kind=kind, steps=steps):
            latents[kind] = model.sample_latents(
                batch.question, args.gamma, args.seed, kind, steps, clip_x0=args.clip_x0
            )

        seconds[kind] = timed(go, device, args.repeats)
    acc = {k: model.generator.query_accuracy(z, batch).mean().item() for k, z in latents.items()}
    config = {
        "tasks": len(batch),
        "gamma": args.gamma,
        "ckpt": str(args.ckpt),
        "repeats": args.repeats,
        "method": model.method,
        "clip_x0": args.clip_x0 if args.clip_x0 is not None else model.hparams.get("clip_x0"),
    }
    out = []
    for kind in ("ddim", "dpm"):
        cfg = {**config, "sampler": kind, "steps": runs[kind], "baseline": "ddpm-1000"}
        out.append(
            figure(
                "sample",
                f"{kind}{runs[kind]}_wall_time",
                seconds[kind],
                "s",
                seconds["ddpm"],
                seconds["ddpm"] / seconds[kind],
                device,
                cfg,
            )
        )
        out.append(
            figure(
                "sample",
                f"{kind}{runs[kind]}_zero_shot_accuracy",
                acc[kind],
                "%",
                acc["ddpm"],
                None,
                device,
                cfg,
            )
        )
    return out
