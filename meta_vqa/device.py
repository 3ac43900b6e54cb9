"""Devices: ``--device auto|cpu|cuda[:i]`` and mixed-precision contexts, for every command that takes them."""

from __future__ import annotations

import contextlib
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
