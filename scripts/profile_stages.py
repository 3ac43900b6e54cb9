"""Where the time of each paper-scale stage step goes (torch.profiler, CPU).

Profiles one step of each stage at the paper's size (adapter D = 394,240, HNet 128 → 128 → 128 → 128 → D,
HyperCLIP encoder D → 128 → 128 → 768, task sizes drawn like Meta-VQA's) and prints, per stage, a table of
the profiled wall time split into:

* shared D-wide matmuls: the HNet's output layer and HyperCLIP's first layer (forward, both backward
  products, the fold of the two, and the reorder of the packed output layer's weight), i.e. every matrix
  product with a D-sized dimension;
* small matmuls: the other linear layers (128-wide);
* adapter products: the per-task batched products (bmm / baddbmm), and the share of them spent on padded
  examples (adapter time × padded-row fraction; the fraction is counted from the masks of every adapter
  call of an unprofiled run);
* D-wide other ops: elementwise ops, copies, gathers and reductions on D-wide weight vectors;
* optimizer steps: torch.optim steps (the meta-optimiser's Adam over the HNet, guidance's Adam over the
  latents) and the inner loops' own latent updates;
* other ops: everything else the profiler saw (activations, losses, normalisation, small copies);
* Python / framework: the Python functions' own time and the wall time outside any recorded event
  (interpreter, autograd bookkeeping).

Stages: ``meta`` (one HNet-MAML meta-step with the Adam step), ``adapt`` (support adaptation of a batch of
latents, as the adaptation dataset does), ``eval`` (the few-shot protocol on a batch of test tasks:
zero-shot, full support and 1..5 shots, each fine-tuned), ``guidance`` (HyperCLIP guidance of a batch of
test tasks, the three controls). It runs on this tree and on trees from before the planned batches (the
chunked API): run it with ``PYTHONPATH`` set to the tree to profile, e.g.::

    cd /path/to/tree && PYTHONPATH=$PWD python /path/to/scripts/profile_stages.py --json out.json

The sizes are kept small enough for the whole run to take a few minutes on a 2-core CPU (16 tasks, 3 inner
and evaluation steps, 5 guidance steps by default); the per-step split is what matters, and the steps
repeat. Numbers under a profiler carry its overhead (the fastest of three unprofiled calls is printed beside
it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import meta_vqa.meta.maml as maml
import meta_vqa.nets.adapter as adapter_mod
from meta_vqa.bench.maml import draw_sizes, make_batch
from meta_vqa.meta.maml import InnerLoop
from meta_vqa.stages.guidance import control_questions
from meta_vqa.stages.hnet import HNetStage
from meta_vqa.stages.hyperclip import HyperCLIPStage

NEW_API = hasattr(maml, "plan_tasks")  # planned groups and buckets (else: chunks of a fixed task count)
MATMULS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_addmm_activation"}
# the packed output layer (meta_vqa.nets.packed): its forward product, and the reorder of its weight
MATMULS |= {"mkldnn::_linear_pointwise", "mkldnn::_reorder_linear_weight"}
ADAPTER = {"aten::bmm", "aten::baddbmm"}
UPDATE_FRAMES = {"adapt", "_adam", "optimize_latents"}  # their own ops (not the loss they call) are updates
STEP = "profile_stages.step"
PY_FRAME = re.compile(r"\.py\(\d+\): ")
ROWS = [
    ("shared", "shared D-wide matmuls"),
    ("small", "small matmuls"),
    ("adapter", "adapter products"),
    ("padding", "  of which padding (est.)"),
    ("dwide", "D-wide other ops"),
    ("optim", "optimizer steps"),
    ("other", "other ops"),
    ("python", "Python / framework"),
]


# --- the stages, on either API -------------------------------------------------------------------------
def hnet_stage(args) -> HNetStage:
    kw = dict(
        feature_dim=args.dim,
        question_dim=args.dim,
        adapter_hidden=args.hidden,
        latent_dim=args.latent,
        hnet_hidden=(128, 128, 128),
        inner_steps=args.steps,
        eval_steps=args.steps,
    )
    if NEW_API:
        kw["max_chunk_mib"] = args.max_chunk_mib
    else:
        kw["chunk_size"] = args.chunk_size
    return HNetStage(**kw)


def meta_step(stage: HNetStage, batch) -> Callable[[], None]:
    # fused, as the Meta-VQA configs ask (one pass over the HNet's 50 M parameters instead of a dozen)
    opt = torch.optim.Adam([p for p in stage.parameters() if p.requires_grad], lr=1e-3, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        stage.meta_gradient(batch if NEW_API else batch.chunks(stage.chunk_size))
        opt.step()

    return step


def guidance_step(args) -> tuple[Callable[[], None], int]:
    hnet = {
        "feature_dim": args.dim,
        "question_dim": args.dim,
        "adapter_hidden": args.hidden,
        "latent_dim": args.latent,
        "hnet_hidden": [128, 128, 128],
    }
    stage = HyperCLIPStage(
        upstream={"class_path": "meta_vqa.stages.hnet.HNetStage", "hparams": hnet},
        feature_dim=args.dim,
        question_dim=args.dim,
        hidden=(128, 128),
        guidance_steps=args.guidance_steps,
    )
    stage.eval()
    g = torch.Generator().manual_seed(args.seed)
    batch = make_batch(
        draw_sizes(args.guidance_tasks, np.random.default_rng(args.seed)),
        args.dim,
        args.dim,
        torch.device("cpu"),
        args.seed,
    )  # noqa: E501
    batch.question = torch.randn(len(batch), args.dim, generator=g)

    def step() -> None:
        if hasattr(stage, "guided_controls"):
            stage.guided_controls(batch)
        else:  # the previous test step: one optimisation per control
            for c in stage.hparams.controls:
                stage.guided_latents(batch.task, control_questions(batch, c))

    return step, stage.generator.adapter.num_params


# --- padding: rows of every adapter call, from its masks ---------------------------------------------------
class PaddingCount:
    """Counts real and padded examples of every adapter loss/accuracy call while installed."""

    def __init__(self) -> None:
        self.real = self.rows = 0
        self.saved: list[tuple[object, str, object]] = []

    def _count(self, mask: torch.Tensor) -> None:
        self.real += int(mask.sum())
        self.rows += mask.numel()

    def __enter__(self) -> PaddingCount:
        originals = {n: getattr(adapter_mod, n) for n in ("task_losses", "task_correct")}
        for name, fn in originals.items():

            def wrapped(logits, labels, mask, _fn=fn):
                self._count(mask)
                return _fn(logits, labels, mask)

            for mod in list(sys.modules.values()):
                if mod is not None and getattr(mod, "__name__", "").startswith("meta_vqa"):
                    if getattr(mod, name, None) is fn:
                        self.saved.append((mod, name, fn))
                        setattr(mod, name, wrapped)
        cls = adapter_mod.ResidualAdapter
        if hasattr(cls, "loss_grad"):
            real_lg = cls.loss_grad

            def loss_grad(ad, w, x, answers, answer_mask, labels, mask, *a, **k):
                self._count(mask)
                return real_lg(ad, w, x, answers, answer_mask, labels, mask, *a, **k)

            self.saved.append((cls, "loss_grad", real_lg))
            cls.loss_grad = loss_grad
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, fn in reversed(self.saved):
            setattr(obj, name, fn)

    @property
    def fraction(self) -> float | None:
        return None if self.rows == 0 else 1.0 - self.real / self.rows


# --- the profile -----------------------------------------------------------------------------------------
def _ancestors(ev):
    p = ev.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _innermost_own_frame(ev) -> str | None:
    for frame in ev.stack or []:  # innermost first
        if "meta_vqa" in frame and "profile_stages" not in frame:
            return frame.rsplit(": ", 1)[-1]
    return None


def classify(ev, D: int) -> str:
    name = ev.name
    shapes = [s for s in (ev.input_shapes or []) if s]
    dwide = any(D in s for s in shapes)
    if name.startswith("Optimizer.") or any(a.name.startswith("Optimizer.") for a in _ancestors(ev)):
        return "optim"
    if PY_FRAME.search(name) or name.startswith("<built-in"):
        return "python"  # a Python function's own time (with_stack records them)
    if name in MATMULS:
        return "shared" if dwide else "small"
    if name in ADAPTER:
        return "adapter"
    if dwide:
        return "dwide"
    backward = any(a.name.startswith("autograd::engine") for a in _ancestors(ev))
    if not backward and _innermost_own_frame(ev) in UPDATE_FRAMES:
        return "optim"
    return "other"


def profile_one(fn: Callable[[], None], D: int, pad: bool) -> dict:
    counter = PaddingCount()
    with counter if pad else _null():
        fn()  # warm-up (and the padding count)
    walls = []
    for _ in range(3):  # the fastest of three: one call is at the mercy of the machine's other work
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        with record_function(STEP):
            fn()
    ms, by_op = defaultdict(float), defaultdict(float)
    (step,) = [ev for ev in prof.events() if ev.name == STEP]
    for ev in prof.events():
        if ev is not step and any(a is step for a in _ancestors(ev)):
            kind = classify(ev, D)
            ms[kind] += ev.self_cpu_time_total / 1e3
            if kind != "python":
                by_op[kind, ev.name] += ev.self_cpu_time_total / 1e3
    ms["python"] += step.self_cpu_time_total / 1e3  # inside the step, outside any recorded event
    prof_wall = step.cpu_time_total / 1e6
    frac = counter.fraction if pad else None
    ms["padding"] = ms["adapter"] * frac if frac is not None else 0.0
    top = defaultdict(list)
    for (kind, name), v in sorted(by_op.items(), key=lambda kv: -kv[1]):
        if len(top[kind]) < 6:
            top[kind].append([name, round(v, 1)])
    return {
        "wall_s": wall,
        "profiled_wall_s": prof_wall,
        "ms": dict(ms),
        "padded_fraction": frac,
        "top_ops": dict(top),
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def table(name: str, res: dict) -> str:
    total = res["profiled_wall_s"] * 1e3
    pad = res["padded_fraction"]
    lines = [
        f"== {name}: {res['wall_s']:.2f} s unprofiled, {res['profiled_wall_s']:.2f} s profiled"
        + ("" if pad is None else f"; padded rows {100 * pad:.1f}% of the adapter's rows"),
        f"{'where':<28}{'ms':>10}{'%':>7}",
    ]
    for key, label in ROWS:
        v = res["ms"].get(key, 0.0)
        lines.append(f"{label:<28}{v:>10.0f}{100 * v / total:>7.1f}")
    for key in ("other", "small"):
        ops = res["top_ops"].get(key, [])[:4]
        if ops:
            lines.append(f"  {key}: " + ", ".join(f"{n} {v:.0f}" for n, v in ops))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["meta", "adapt", "eval", "guidance"])
    p.add_argument("--tasks", type=int, default=16, help="tasks of the meta-batch / adaptation / test batch")
    p.add_argument("--steps", type=int, default=3, help="inner steps (meta-training, adaptation, few-shot)")
    p.add_argument("--guidance-tasks", type=int, default=16, help="test tasks guided (× 3 controls)")
    p.add_argument("--guidance-steps", type=int, default=5, help="guidance Adam steps")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--max-chunk-mib", type=float, default=1024.0, help="memory budget (planned tree)")
    p.add_argument("--chunk-size", type=int, default=8, help="tasks per chunk (chunked tree; conf: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)

    try:  # the CLI's allocator setting, where the profiled tree has it (META_VQA_MALLOC=system: glibc's default)
        from meta_vqa.device import reuse_freed_memory

        allocator = "freed blocks reused" if reuse_freed_memory() else "glibc default"
    except ImportError:
        allocator = "glibc default"
    try:  # the packed output layer, where the profiled tree has it (META_VQA_PACKED_LINEAR=0: off)
        from meta_vqa.nets import packed

        output_layer = "packed" if packed.available() else "nn.Linear"
    except ImportError:
        output_layer = "nn.Linear"
    torch.manual_seed(args.seed)
    api = "planned groups and buckets" if NEW_API else f"chunks of {args.chunk_size} tasks"
    print(
        f"# {api}; allocator: {allocator}; output layer: {output_layer}; torch {torch.__version__}, {torch.get_num_threads()} threads; tasks {args.tasks}, "
        f"steps {args.steps}, guidance {args.guidance_tasks} tasks × 3 controls × {args.guidance_steps} steps"
    )
    out = {"api": api, "args": vars(args), "stages": {}}
    stage = batch = None
    if {"meta", "adapt", "eval"} & set(args.stages):
        stage = hnet_stage(args)
        sizes = draw_sizes(args.tasks, np.random.default_rng(args.seed))
        batch = make_batch(sizes, args.dim, args.dim, torch.device("cpu"), args.seed)
        out["support_sizes"] = [s[0] for s in sizes]
    D = 2 * args.dim * args.hidden + args.hidden + args.dim
    loop = InnerLoop(args.steps, 0.1, True)
    steps = {
        "meta": lambda: meta_step(stage, batch),
        "adapt": lambda: lambda: stage.support_latents(batch, loop),
        "eval": lambda: (
            lambda: stage.protocol.evaluate(
                stage.adapter, batch, stage.init_latents(batch.task).detach(), stage.to_weights
            )
        ),
    }
    titles = {
        "meta": "HNet-MAML meta-training step (inner loop, outer backward, Adam)",
        "adapt": "adaptation dataset: support adaptation of a batch of latents",
        "eval": "few-shot evaluation (zero-shot, full, 1..5 shots)",
        "guidance": "HyperCLIP guidance (3 controls)",
    }
    for name in args.stages:
        if name == "guidance":
            fn, _ = guidance_step(args)
            res = profile_one(fn, D, pad=False)
        else:
            res = profile_one(steps[name](), D, pad=True)
        out["stages"][name] = res
        print(table(f"{name}: {titles[name]}", res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
