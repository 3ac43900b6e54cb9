"""Image-encoding throughput of an open_clip model (to become ``meta-vqa bench clip``).

Measures ``encode_image`` on random pixels with random weights (no download), in float32 and under mixed
precision autocast, so the cost of encoding the benchmark's 64,665 images can be planned on a machine.
The module has the ``add_arguments`` / ``run`` pair of a bench module; each figure is a dict with the keys
``bench, figure, value, unit, baseline_value, ratio, device, config``; the float32 run is the baseline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from meta_vqa.data.encode import images_to_input
from meta_vqa.device import autocast, device_name, resolve_device
from meta_vqa.prepare.clip_encode import load_clip_encoder


@torch.no_grad()
def image_throughput(
    model: str = "ViT-L-14-336",
    batch_size: int = 16,
    batches: int = 3,
    precisions: Sequence[str] = ("fp32", "bf16"),
    device: str = "auto",
    warmup: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Images per second of ``encode_image`` (input normalisation included) per precision.

    Each precision runs ``warmup`` untimed batches, then ``batches`` timed ones; the figure is their
    total images over total time.
    """
    dev = resolve_device(device)
    encoder = load_clip_encoder(model, None, dev)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, encoder.image_size, encoder.image_size), generator=g)
    pixels = pixels.to(torch.uint8).to(dev)
    figures, base = [], None
    for precision in precisions:

        def step(precision: str = precision) -> None:
            with autocast(dev, precision):
                encoder.model.encode_image(images_to_input(pixels, encoder.mean, encoder.std)).float()

        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(batches):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        value = batches * batch_size / (time.perf_counter() - t0)
        base = value if base is None else base
        is_base = precision == precisions[0]
        figures.append(
            {
                "bench": "clip",
                "figure": f"image_encode_{precision}",
                "value": value,
                "unit": "images/s",
                "baseline_value": None if is_base else base,
                "ratio": None if is_base else value / base,
                "device": device_name(dev),
                "config": {
                    "model": model,
                    "weights": "random",
                    "image_size": encoder.image_size,
                    "batch_size": batch_size,
                    "batches": batches,
                    "warmup": warmup,
                    "precision": precision,
                    "baseline": f"{precisions[0]}, same run",
                },
            }
        )
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-L-14-336", help="open_clip model name")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per precision")
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated; the first is the baseline"
    )
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> list[dict]:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    return image_throughput(args.model, args.batch_size, args.batches, precisions, args.device)
