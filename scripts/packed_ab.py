"""Time the HNet's packed output layer against the default one, alternating the two within one process.

Separate runs of `meta-vqa bench hnet` with and without ``META_VQA_PACKED_LINEAR=0`` differ by more than the
packing gains on a shared VM, whose memory bandwidth and matmul rate drift between (and during) runs. Here
both sides run in turn on one HNet and one batch (paper scale by default: D = 394,240, 32 tasks with
Meta-VQA task sizes, 10 inner steps), in the order AB BA AB ..., so drift lands on both. Per side it prints
the median and fastest of ``--calls`` timed calls of

* a meta-training step (inner loop, outer backward, fused Adam), and
* the support adaptation of the batch's latents (the adaptation dataset's work),

and checks that the two sides' adapted latents are equal bit for bit (the packed layer is only used where
its kernel sums in the default order). Run from the repository root:

    python scripts/packed_ab.py [--tasks 32] [--steps 10] [--calls 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_stages import hnet_stage, meta_step  # noqa: E402

from meta_vqa.bench.maml import draw_sizes, make_batch  # noqa: E402
from meta_vqa.device import reuse_freed_memory  # noqa: E402
from meta_vqa.meta.maml import InnerLoop  # noqa: E402
from meta_vqa.nets import packed  # noqa: E402

SIDES = {"default": "0", "packed": "1"}  # side -> META_VQA_PACKED_LINEAR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="inner steps")
    p.add_argument("--calls", type=int, default=8, help="timed calls per side and kind")
    p.add_argument("--dim", type=int, default=768, help="feature width (768: D = 394,240)")
    p.add_argument("--hidden", type=int, default=256, help="adapter hidden width")
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--max-chunk-mib", type=float, default=1024.0)
    p.add_argument("--min-weights", type=int, default=packed.MIN_WEIGHTS, help="pack layers from this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.chunk_size = 0  # profile_stages' older-tree option, unused here

    reuse_freed_memory()
    packed.MIN_WEIGHTS = args.min_weights
    torch.manual_seed(args.seed)
    stage = hnet_stage(args)
    layer = stage.hnet.layers[-1]
    if not isinstance(layer, packed.PackedLinear):
        print(
            f"error: the output layer ({layer.weight.numel():,} weights) is below --min-weights",
            file=sys.stderr,
        )
        return 2
    batch = make_batch(draw_sizes(args.tasks, np.random.default_rng(args.seed)), args.dim, args.dim,
                       torch.device("cpu"), args.seed)  # fmt: skip
    loop = InnerLoop(args.steps, 0.1, True)
    kinds = {"meta": meta_step(stage, batch), "adapt": lambda: stage.support_latents(batch, loop)}
    before = os.environ.get("META_VQA_PACKED_LINEAR")
    times = {(k, s): [] for k in kinds for s in SIDES}
    latents = {}
    try:
        for kind, fn in kinds.items():
            for value in SIDES.values():  # warm-up; the packed side makes its copy here
                os.environ["META_VQA_PACKED_LINEAR"] = value
                fn(), fn()
            for i in range(args.calls):
                for side in SIDES if i % 2 == 0 else reversed(SIDES):
                    os.environ["META_VQA_PACKED_LINEAR"] = SIDES[side]
                    t = time.perf_counter()
                    out = fn()
                    times[kind, side].append(time.perf_counter() - t)
                    if kind == "adapt":
                        latents.setdefault(side, out.detach().clone())
        os.environ["META_VQA_PACKED_LINEAR"] = SIDES["packed"]
        packs = packed.available()
    finally:
        if before is None:
            os.environ.pop("META_VQA_PACKED_LINEAR", None)
        else:
            os.environ["META_VQA_PACKED_LINEAR"] = before
    exact = packed._EXACT_FROM.get(tuple(layer.weight.shape))
    same = torch.equal(latents["default"], latents["packed"])
    D = layer.out_features
    print(f"# D = {D:,}, {args.tasks} tasks, {args.steps} inner steps, {torch.get_num_threads()} threads; "
          f"packed kernel here: {'yes' if packs else 'no'}, from {exact} rows on")  # fmt: skip
    res = {"D": D, "tasks": args.tasks, "steps": args.steps, "packs": packs, "exact_from": exact}
    res["latents_identical"] = same
    for kind in kinds:
        med = {s: statistics.median(times[kind, s]) for s in SIDES}
        fast = {s: min(times[kind, s]) for s in SIDES}
        ratio = med["default"] / med["packed"]
        print(f"{kind:6s} default {med['default']:.3f} s (fastest {fast['default']:.3f})   packed "
              f"{med['packed']:.3f} s (fastest {fast['packed']:.3f})   ×{ratio:.2f}")  # fmt: skip
        res[kind] = {
            "median_s": med,
            "fastest_s": fast,
            "ratio": ratio,
            "calls_s": {s: times[kind, s] for s in SIDES},
        }
    print(f"adapted latents identical on both sides: {'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
