"""`meta-vqa bench maml|hnet` at toy sizes: the JSON contract and ratios consistent with the values."""

import json
import platform
import sys
import time

import pytest
import torch

from meta_vqa.bench import PeakMemory, cpu_times, steal_fraction
from meta_vqa.cli import main
from meta_vqa.device import heap_in_use, reuse_freed_memory

TOY = [
    "--json",
    "--tasks",
    "3",
    "--steps",
    "2",
    "--dim",
    "8",
    "--hidden",
    "4",
    "--repeats",
    "1",
    "--device",
    "cpu",
]


def _rows(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    "name, extra", [("maml", []), ("hnet", ["--latent", "4", "--hnet-hidden", "8", "8"])]
)
def test_bench_prints_the_figure_contract(name, extra, capsys):
    assert main(["bench", name, *TOY, *extra]) == 0
    rows = _rows(capsys)
    assert any(r["unit"] == "MiB" for r in rows) and any(r["unit"].endswith("/s") for r in rows)
    for r in rows:
        assert set(r) == {"bench", "figure", "value", "unit", "baseline_value", "ratio", "device", "config"}
        assert r["bench"] == name
        if r["unit"] == "MiB":  # peak memory (may be 0 at toy sizes)
            assert r["value"] >= 0 and r["baseline_value"] >= 0 and r["ratio"] is None
            continue
        assert r["value"] > 0 and r["baseline_value"] > 0
        if r["unit"] == "fraction":  # of this machine's measured bandwidth / matmul peak
            assert "bandwidth_GBps" in r["config"] and "matmul_GFLOPps" in r["config"]
        if r["ratio"] is not None:
            # throughput: higher is better, so the ratio is ours over the baseline's
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"], rel=1e-6)
        if r["unit"].endswith("/s"):  # every timed call, and the rate of the fastest: at least the median's
            calls, fastest = r["config"]["call_s"], r["config"]["fastest_per_s"]
            assert set(calls) == set(fastest) == {"ours", "baseline"} and len(calls["ours"]) == 1
            assert fastest["ours"] >= r["value"] * (1 - 1e-3) and fastest["baseline"] >= r[
                "baseline_value"
            ] * (1 - 1e-3)
        if sys.platform.startswith("linux"):  # the hypervisor's share of the CPU time during the run
            assert 0.0 <= r["config"]["cpu_steal_fraction"] <= 1.0


def test_steal_fraction_reads_the_steal_column_of_proc_stat():
    stat = lambda steal, idle: f"cpu  100 0 50 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"  # noqa: E731
    before, after = cpu_times(stat(10, 840)), cpu_times(stat(40, 900))
    assert before == (10, 1000) and after == (40, 1090)
    assert steal_fraction(before, after) == pytest.approx(30 / 90)
    assert steal_fraction(before, None) is None and cpu_times("intr 1 2 3\n") is None


def test_bench_guidance_reports_wall_time_against_the_per_task_loop(capsys):
    toy = ["--tasks", "4", "--steps", "2", "--dim", "8", "--hidden", "4", "--latent", "4"]
    toy += ["--hnet-hidden", "8", "--encoder-hidden", "8", "--baseline-rows", "2", "--device", "cpu"]
    assert main(["bench", "guidance", "--json", *toy]) == 0
    rows = {r["figure"]: r for r in _rows(capsys)}
    wall = rows["wall_s"]
    assert wall["unit"] == "s" and wall["value"] > 0 and wall["baseline_value"] > 0
    assert wall["ratio"] == pytest.approx(
        wall["baseline_value"] / wall["value"], rel=1e-6
    )  # time: lower is better
    assert wall["config"]["rows"] == 12 and wall["config"]["max_abs_latent_diff"] < 1e-5
    assert {"guidance_shared_MB_per_task", "guidance_bandwidth_fraction", "guidance_matmul_fraction"} <= set(
        rows
    )
    assert rows["guidance_bandwidth_fraction"]["config"]["bandwidth_GBps"] > 0


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC or heap_in_use() is None, reason="glibc 2.33+ (mallinfo2) only")
def test_peak_memory_counts_memory_reused_from_pages_already_held():
    """The CLI keeps freed blocks mapped, so a block that allocates into them grows no resident set: the peak
    is read from what the process holds from malloc, which does grow."""
    reuse_freed_memory()
    held = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB faulted in, then freed: kept mapped
    del held
    cpu = torch.device("cpu")
    with PeakMemory(cpu) as m:
        t = torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
        time.sleep(0.05)  # longer than the sampling interval
        del t
    assert m.source == "malloc"
    assert 47 <= m.mib <= 60
    with PeakMemory(cpu) as quiet:
        time.sleep(0.01)
    assert abs(quiet.mib) < 1


def test_call_spread_reports_every_call_and_the_fastest_rate():
    from meta_vqa.bench import call_spread

    spread = call_spread({"ours": [0.5, 0.8, 2.0], "baseline": [4.0, 5.0]}, 32)
    assert spread["call_s"] == {"ours": [0.5, 0.8, 2.0], "baseline": [4.0, 5.0]}
    assert spread["fastest_per_s"] == {"ours": 64.0, "baseline": 8.0}


def test_timed_reports_the_median_of_the_calls(monkeypatch):
    import meta_vqa.bench as bench

    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "wall_times", lambda fn, device, repeats, warmup=1: [1.0, 3.0])
    assert bench.timed(lambda: None, cpu, 2) == 2.0  # not the slower of two
    monkeypatch.setattr(bench, "wall_times", lambda fn, device, repeats, warmup=1: [1.0, 2.0, 9.0])
    assert bench.timed(lambda: None, cpu, 3) == 2.0


def test_timed_peak_times_no_call_under_the_memory_sampler():
    """The peak is measured in a call of its own, made first: the sampler's thread (it takes CPU time and
    malloc's lock) is running during that call only."""
    import threading

    from meta_vqa.bench import timed_peak

    reuse_freed_memory()
    threads = []

    def fn():
        threads.append(threading.active_count())
        t = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
        time.sleep(0.005)
        del t

    seconds, mib = timed_peak(fn, torch.device("cpu"), 3)
    assert len(threads) == 4  # the measured call and 3 timed ones
    if heap_in_use() is not None:  # glibc: the sampler thread runs in the first call only
        assert threads[0] == threads[1] + 1 and len(set(threads[1:])) == 1
        assert 7 <= mib <= 12
    assert seconds >= 0.005
