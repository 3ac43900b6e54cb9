"""``meta-vqa bench NAME``: performance figures measured against the straightforward baseline in one run.

Each figure is printed as one JSON object (``--json``) with the keys
``bench, figure, value, unit, baseline_value, ratio, device, config``; ``ratio`` > 1 means ours is better.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from meta_vqa.device import device_name, heap_in_use, resolve_device  # noqa: F401  (benches import them here)
from meta_vqa.errors import MetaVQAError

BENCHES = {
    "maml": "meta_vqa.bench.maml",
    "hnet": "meta_vqa.bench.hnet",
    "sample": "meta_vqa.bench.sample",
    "guidance": "meta_vqa.bench.guidance",
    "clip": "meta_vqa.prepare.clip_bench",
}
LATER: dict[str, str] = {}
# one line each for `meta-vqa bench --help`
ABOUT = {
    "maml": "meta-training throughput: the batched MAML step vs a per-task loop (paper scale)",
    "hnet": "HNet-MAML meta-training and evaluation: planned over tasks vs a per-task loop",
    "sample": "zero-shot weights from a trained HyperLDM: DDPM-1000 vs DDIM/DPM-Solver in few steps",
    "guidance": "HyperCLIP guidance of the test tasks: planned vs per task and control",
    "clip": "image-encoding throughput of an open_clip model (fp32 vs mixed precision)",
}


def wall_times(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Sorted wall times of ``repeats`` calls of ``fn`` in seconds (after ``warmup`` calls), synchronising
    CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` calls), synchronising CUDA; of an even number
    of calls, the mean of the middle two."""
    times = wall_times(fn, device, repeats, warmup)
    return statistics.median(times)


def calls_peak(
    fn: Callable[[], object], device: torch.device, repeats: int
) -> tuple[list[float], float | None]:
    """``(sorted wall times of repeats calls in s, peak memory in MiB)``: the peak is measured in one more
    call made first (it is also the warm-up), because on CPU the memory sampler takes CPU time and
    ``malloc``'s lock while it runs (about 5 % of a paper-scale meta-step on 2 cores), so no timed call runs
    under it."""
    with PeakMemory(device) as m:
        fn()
    return wall_times(fn, device, repeats, warmup=0), m.mib


def timed_peak(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """``(median wall time of repeats calls in s, peak memory in MiB)`` (:func:`calls_peak`)."""
    times, mib = calls_peak(fn, device, repeats)
    return statistics.median(times), mib


def call_spread(per_call: dict[str, list[float]], work: float) -> dict:
    """Config entries that show how much the timed calls of each side (``ours``, ``baseline``, ...) spread:
    their wall times in s, and ``work`` (tasks, latents, ...) over the fastest call. On a shared machine the
    hypervisor and its other tenants only ever add time, so the fastest call is the least disturbed
    estimate; the figure's value stays the median."""
    return {
        "call_s": {k: [round(t, 4) for t in v] for k, v in per_call.items()},
        "fastest_per_s": {k: work / min(v) for k, v in per_call.items() if v},
    }


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of the code in a ``with`` block, in MiB (``.mib``; None where it cannot be measured).

    CUDA: the allocator's peak (``max_memory_allocated``). CPU: the peak growth of the bytes the process
    holds from ``malloc`` over those held at entry (glibc's ``mallinfo2``), sampled every ``interval`` s, so
    it counts what the block allocates and frees again, up to the sampling granularity; where that cannot
    be read, the growth of the resident set (/proc, Linux), which misses memory reused from pages the
    process already holds (the CLI keeps freed blocks mapped: :func:`meta_vqa.device.reuse_freed_memory`).
    ``source`` names the measure used.
    """

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device, self.interval, self.mib = device, interval, None
        self._stop = threading.Event()
        self._read = _rss_bytes
        self.source = "cuda" if device.type == "cuda" else "rss"
        if device.type != "cuda" and heap_in_use() is not None:
            self._read, self.source = heap_in_use, "malloc"

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._read()
            self._peak = self._base or 0
            if self._base is not None:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._read() or 0)
            self.mib = (self._peak - self._base) / 2**20


@dataclass(frozen=True)
class Limits:
    """What this machine can do, measured in the same run as a bench: memory bandwidth (a STREAM-like
    triad ``a = b + s·c``, 3 arrays counted) and fp32 matmul throughput (a large square product)."""

    bandwidth: float  # bytes/s
    flops: float  # FLOP/s

    def config(self) -> dict:
        return {"bandwidth_GBps": self.bandwidth / 1e9, "matmul_GFLOPps": self.flops / 1e9}


def measure_limits(device: torch.device, mib: int = 256, n: int = 2048, repeats: int = 3) -> Limits:
    """:class:`Limits` of ``device``: the triad over three ``mib`` MiB arrays, an ``n`` × ``n`` fp32 matmul
    (4096 on CUDA); the best of ``repeats`` after one warm-up, as STREAM reports."""
    m = mib * 2**20 // 4
    b = torch.rand(m, device=device)
    c = torch.rand(m, device=device)
    a = torch.empty_like(b)
    n = 4096 if device.type == "cuda" else n
    x = torch.rand(n, n, device=device)
    y = torch.rand(n, n, device=device)
    out = torch.empty(n, n, device=device)

    def best(fn) -> float:
        return wall_times(fn, device, repeats)[0]

    t_triad = best(lambda: torch.add(b, c, alpha=3.0, out=a))
    t_mm = best(lambda: torch.mm(x, y, out=out))
    return Limits(3 * m * 4 / t_triad, 2 * n**3 / t_mm)


@dataclass(frozen=True)
class Work:
    """The useful work of one timed call: tasks done, bytes of shared weights read (every pass through a
    shared matrix reads it once), and the FLOPs of the shared layers and the adapter products on the real
    (unpadded) examples."""

    tasks: int
    shared_bytes: float
    flops: float


def roofline(
    bench: str,
    name: str,
    ours: Work,
    t_ours: float,
    base: Work,
    t_base: float,
    limits: Limits,
    device: torch.device,
    config: dict,
) -> list[dict]:
    """Figures that place a timed call against the machine: shared-weight MB read per task, and the
    achieved fractions of the measured bandwidth (shared weights read per second) and matmul peak."""
    cfg = {**config, **limits.config()}
    per_task = lambda w: w.shared_bytes / max(w.tasks, 1) / 1e6  # noqa: E731
    bw = lambda w, t: w.shared_bytes / t / limits.bandwidth  # noqa: E731
    fl = lambda w, t: w.flops / t / limits.flops  # noqa: E731
    return [
        figure(bench, f"{name}_shared_MB_per_task", per_task(ours), "MB/task", per_task(base), None, device, cfg),
        figure(bench, f"{name}_bandwidth_fraction", bw(ours, t_ours), "fraction", bw(base, t_base), None, device, cfg),
        figure(bench, f"{name}_matmul_fraction", fl(ours, t_ours), "fraction", fl(base, t_base), None, device, cfg),
    ]  # fmt: skip


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA allocator peak"
    if heap_in_use() is not None:
        return "peak growth of the bytes held from malloc during the timed calls (glibc mallinfo2, sampled every 1 ms)"
    return "peak growth of the process resident set during the timed calls (sampled every 1 ms)"


def figure(
    bench: str,
    name: str,
    value: float,
    unit: str,
    baseline: float | None,
    ratio: float | None,
    device: torch.device,
    config: dict,
) -> dict:
    return {
        "bench": bench,
        "figure": name,
        "value": value,
        "unit": unit,
        "baseline_value": baseline,
        "ratio": ratio,
        "device": device_name(device),
        "config": config,
    }


def emit(figures: list[dict], as_json: bool) -> None:
    for f in figures:
        if as_json:
            print(json.dumps(f))
        else:
            base = "" if f["baseline_value"] is None else f"  baseline {f['baseline_value']:.4g}"
            ratio = "" if f["ratio"] is None else f"  ratio {f['ratio']:.2f}x"
            print(f"{f['bench']}/{f['figure']}: {f['value']:.4g} {f['unit']}{base}{ratio}  [{f['device']}]")


def cpu_times(stat: str | None = None) -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from ``/proc/stat`` (or its text ``stat``); None off Linux.

    Steal is the time the hypervisor gave this VM's virtual CPUs to someone else: on a shared host it slows
    every timed call by that fraction, so each bench records it beside its figures."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.read()
        except OSError:
            return None
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            if len(ticks) < 8:
                return None
            return ticks[7], sum(ticks)
    return None


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, BENCHES))
        print(
            "usage: meta-vqa bench NAME [--json] [options]\n\n"
            "Measure a performance figure against the straightforward baseline in one run; --json prints one\n"
            "JSON object per figure (ratio > 1: ours is better). `meta-vqa bench NAME --help` lists its options.\n\n"
            "benches:\n" + "\n".join(f"  {n:<{width}}  {ABOUT.get(n, '')}" for n in BENCHES)
        )
        return 0
    name, rest = argv[0], argv[1:]
    if name in LATER:
        raise MetaVQAError(f"bench {name!r} is not yet available (arrives with {LATER[name]})")
    if name not in BENCHES:
        raise MetaVQAError(f"unknown bench {name!r}; available: {', '.join(BENCHES)}")
    module = __import__(BENCHES[name], fromlist=["run"])
    parser = argparse.ArgumentParser(prog=f"meta-vqa bench {name}")
    parser.add_argument("--json", action="store_true", help="one JSON object per figure")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    before = cpu_times()
    figures = module.run(args)
    steal = steal_fraction(before, cpu_times())
    if steal is not None:
        for f in figures:
            f["config"] = {**f["config"], "cpu_steal_fraction": steal}
        if steal > 0.05 and not args.json:
            print(
                f"note: the hypervisor took {steal:.0%} of this machine's CPU time during the run (steal); "
                "absolute rates are low by about that much, ratios within the run less so"
            )
    emit(figures, args.json)
    sys.stdout.flush()
    return 0
