"""The CLI's allocator setting: large freed blocks are reused instead of faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

import meta_vqa.device as device

# allocate, touch and free a 64 MiB tensor 20 times; print the page faults of the last 10 rounds
FAULTS = """
import resource, sys, torch
from meta_vqa.device import reuse_freed_memory
print(reuse_freed_memory() if sys.argv[1] == "tuned" else False)
for i in range(20):
    if i == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20).fill_(1.0)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_blocks_are_reused_without_page_faults():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
        ).stdout.split()  # fmt: skip
        return out[0], int(out[1])

    done, tuned = faults("tuned")
    _, default = faults("default")
    pages = 10 * (64 << 20) // 4096
    assert done == "True"
    assert default > pages // 2  # glibc maps a fresh block each time: every page faults again
    assert tuned < pages // 4  # freed blocks are reused (a few are kept, so some rounds still fault)


def test_user_choices_are_kept(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("mallopt called")

    monkeypatch.setattr(device.ctypes, "CDLL", fail)
    monkeypatch.setenv("META_VQA_MALLOC", "system")
    assert device.reuse_freed_memory() is False
    monkeypatch.delenv("META_VQA_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000")
    assert device.reuse_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert device.reuse_freed_memory() is False
