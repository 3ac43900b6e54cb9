"""Devices: ``--device auto|cpu|cuda[:i]`` and mixed-precision contexts, for every command that takes them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from typing import Literal, get_args

import torch

from meta_vqa.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the GPU if there is one, else the CPU; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (N threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass (``fp32``: none); fp16 needs a GPU, a CPU runs bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_trainer_precision(precision: object, accelerator: object, key: str = "trainer.precision") -> None:
    """Lightning's float16 precisions need CUDA: refuse them, in one line, where training would run on a
    CPU (``accelerator`` cpu, or auto without a GPU); a CPU runs ``bf16-mixed``."""
    half = str(precision) in ("16", "16-mixed", "16-true")
    acc = str(accelerator or "auto")
    on_cpu = acc == "cpu" or (acc in ("auto", "gpu", "cuda") and not torch.cuda.is_available())
    if half and on_cpu:
        raise ConfigError(
            f"{key}: {precision} (float16) needs a CUDA GPU and none is available; use bf16-mixed on the CPU"
        )


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def reuse_freed_memory() -> bool:
    """Keep large freed blocks in the process for reuse instead of giving them back to the system (glibc
    only; returns whether it was done).

    By default glibc serves every block over 32 MB with a fresh ``mmap`` and unmaps it when freed, so each
    pass of the HNet's output layer (a [tasks, 394,240] float32 result, 50 MB for 32 tasks) first faults in
    its pages again: about a quarter of a paper-scale meta-training step on this CPU went to page faults.
    ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap and ``M_TRIM_THRESHOLD`` 1 GiB keeps up to
    that much freed memory mapped, so the next step reuses it. The resident set then stays at its peak
    instead of shrinking between steps. Skipped where the user chose: ``META_VQA_MALLOC=system``, any
    ``MALLOC_*_`` tuning variable, or another allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc).
    """
    if os.environ.get("META_VQA_MALLOC", "").lower() == "system":
        return False
    if any(k in os.environ for k in _MALLOC_ENV) or "alloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


_MALLINFO2 = None


def heap_in_use() -> int | None:
    """Bytes the process holds from ``malloc`` right now (glibc's ``mallinfo2``: the blocks in use in every
    arena plus those mapped on their own), or None where that cannot be read (another libc, glibc before
    2.33, another allocator preloaded).

    Unlike the resident set, this falls again when memory is freed and rises whenever it is allocated, even
    into pages kept from earlier (:func:`reuse_freed_memory`), so the peak of a block of code can be read
    from it. Torch's CPU tensors are ``malloc``'d.
    """
    global _MALLINFO2
    if _MALLINFO2 is None:
        _MALLINFO2 = False
        if (
            sys.platform.startswith("linux")
            and platform.libc_ver()[0] == "glibc"
            and "alloc" not in os.environ.get("LD_PRELOAD", "")
        ):
            try:
                fn = ctypes.CDLL("libc.so.6").mallinfo2
                fn.restype = _MallInfo2
                _MALLINFO2 = fn
            except (OSError, AttributeError):
                pass
    if not _MALLINFO2:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)
