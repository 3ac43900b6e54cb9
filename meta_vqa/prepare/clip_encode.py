"""Encode the Meta-VQA images, questions and answer prompts with an open_clip model, resumably.

The authors' feature extraction (reproduced here): every image is resized *whole* to the model's input
size with bicubic interpolation (no aspect-preserving resize, no centre crop), converted to RGB, scaled
to [0, 1] and normalised with the model's mean/std (OpenAI CLIP's for their ViT-L/14@336px); questions are
encoded as raw strings and answer prompts as the question's template filled with each answer. Features
are the un-normalised float32 outputs of ``encode_image`` / ``encode_text``.

Images are encoded in shards of ``shard_size`` rows, each written atomically with the ids it holds and a
fingerprint of everything that determines its values (model, weights, preprocessing, precision, the image
list), so a killed run resumes from the last finished shard and a changed setting never reuses a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from meta_vqa.data.encode import answer_prompts, encode_texts, images_to_input
from meta_vqa.data.features import save_tensors
from meta_vqa.data.tasks import Task
from meta_vqa.device import Precision, autocast
from meta_vqa.errors import ConfigError, DataError
from meta_vqa.io import sha256_file

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0
PREPROCESSING = "whole image resized to the model input size (bicubic, no crop), RGB, /255, mean/std"


@dataclass
class ClipEncoder:
    """An open_clip model with what encoding needs: its tokenizer, input size and normalisation."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict  # model name, pretrained tag or weight-file sha256 (for the manifest and the fingerprint)


def load_clip_encoder(name: str, pretrained: str | None, device: torch.device | str = "cpu") -> ClipEncoder:
    """Build open_clip model ``name`` with weights ``pretrained``: a tag (``openai``; needs open_clip's
    cache offline), a weight file, or ``None`` / ``"none"`` for random weights (tests, benchmarks)."""
    import open_clip

    if name not in open_clip.list_models():
        raise ConfigError(f"--clip {name}: not an open_clip model name (see open_clip.list_models())")
    info: dict = {"model": name, "pretrained": None}
    if pretrained in (None, "none"):
        pretrained = None
    elif Path(pretrained).is_file():
        if Path(pretrained).suffix in (".npy", ".npz"):  # open_clip would read these with numpy
            raise ConfigError(f"--pretrained {pretrained}: use a .safetensors or torch state-dict file")
        info |= {"pretrained": "file", "weights_file": str(Path(pretrained).resolve())}
        info["weights_sha256"] = sha256_file(pretrained)
    elif pretrained in open_clip.list_pretrained_tags_by_model(name):
        info["pretrained"] = pretrained
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigError(
            f"--pretrained {pretrained}: neither a file nor a weight tag of {name} (tags: {tags})"
        )
    if pretrained is None:
        info["seed"] = RANDOM_WEIGHTS_SEED
    try:
        # Random weights are seeded (on a forked RNG), so every run draws the same ones and a resumed
        # encoding stays consistent with its finished shards.
        with torch.random.fork_rng(devices=[], enabled=pretrained is None):
            if pretrained is None:
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except Exception as e:  # network, cache and checkpoint errors come in many types
        raise DataError(f"--pretrained {pretrained}: cannot load the weights of {name} ({e})") from None
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = size if isinstance(size, int) else size[0]
    model.eval()
    return ClipEncoder(
        model, open_clip.get_tokenizer(name), int(size), tuple(cfg["mean"]), tuple(cfg["std"]), info
    )


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file as uint8 ``[3, size, size]``: resized whole (bicubic), then converted to RGB.

    The order (resize, then RGB) is the authors'; it only matters for the rare non-RGB JPEG.
    """
    try:
        with Image.open(path) as im:
            im = im.resize((size, size), Image.BICUBIC).convert("RGB")
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return pixels.view(size, size, 3).permute(2, 0, 1).contiguous()


def coco_image_paths(coco_root: str | Path, tasks: Sequence[Task], image_ids: Sequence[str]) -> list[Path]:
    """The file of each image id: ``<coco_root>/<train2014|val2014>/<id>.jpg`` (or directly in the root)."""
    root = Path(coco_root)
    first_task = {}
    for t in tasks:
        for img, _ in t.support + t.query:
            first_task.setdefault(img, t.question)
    paths = []
    for img in image_ids:
        subset = img.split("_")[1] if img.count("_") >= 2 else ""
        candidates = [root / subset / f"{img}.jpg", root / f"{img}.jpg"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(
                f"{candidates[0]}: image {img!r} of task {first_task.get(img)!r} not found under {root}"
            )
        paths.append(path)
    return paths


class _ImageFiles(Dataset):
    """Decodes images in DataLoader workers; a read error travels back as a message (one line, raised
    by the main process), not as a worker traceback."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return load_image(self.paths[i], self.size), ""
        except DataError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(e)


def _fingerprint(encoder: ClipEncoder, precision: str, extra: object) -> str:
    what = {
        "model": encoder.info,
        "preprocessing": [PREPROCESSING, encoder.image_size, encoder.mean, encoder.std],
        "precision": precision,
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"images-{k:05d}.safetensors"


def _shard_is_done(path: Path, fingerprint: str, ids: Sequence[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = f.get_slice("features").get_shape()[0]
    except Exception:  # an unreadable shard is simply redone
        return False
    return (
        meta.get("fingerprint") == fingerprint
        and json.loads(meta.get("ids", "[]")) == list(ids)
        and rows == len(ids)
    )


def _write_shard(path: Path, features: torch.Tensor, fingerprint: str, ids: Sequence[str]) -> None:
    save_tensors(path, {"features": features}, {"fingerprint": fingerprint, "ids": json.dumps(list(ids))})


@torch.no_grad()
def encode_images_sharded(
    encoder: ClipEncoder,
    image_ids: Sequence[str],
    paths: Sequence[Path],
    shard_dir: str | Path,
    shard_size: int = 4096,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: Precision = "fp32",
    workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Raw image features ``[N, d]`` (float32, CPU) in the order of ``image_ids``, resuming from shards.

    Shard ``k`` holds rows ``k·shard_size`` to ``(k+1)·shard_size``; finished shards whose fingerprint
    and ids match are loaded instead of encoded.
    """
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"--shard-size and --batch-size must be positive, got {shard_size}, {batch_size}")
    device = torch.device(device)
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(
        encoder, precision, {"ids": hashlib.sha256("\n".join(image_ids).encode()).hexdigest()}
    )
    shards = [
        list(range(s, min(s + shard_size, len(image_ids)))) for s in range(0, len(image_ids), shard_size)
    ]
    todo = [
        k for k, rows in enumerate(shards)
        if not _shard_is_done(_shard_path(shard_dir, k), fingerprint, [image_ids[r] for r in rows])
    ]  # fmt: skip
    done = len(image_ids) - sum(len(shards[k]) for k in todo)
    if done:
        log.info("%s: %d of %d images already encoded in finished shards", shard_dir, done, len(image_ids))
    # One loader over the remaining images; batches never cross a shard boundary.
    order = [r for k in todo for r in shards[k]]
    batches, pos = [], 0
    for k in todo:
        n = len(shards[k])
        batches += [list(range(pos + s, pos + min(s + batch_size, n))) for s in range(0, n, batch_size)]
        pos += n
    loader = DataLoader(
        _ImageFiles([paths[r] for r in order], encoder.image_size),
        batch_sampler=batches,
        num_workers=workers if batches else 0,
        pin_memory=device.type == "cuda",
    )
    model = encoder.model.to(device).eval()
    bar = tqdm(total=len(image_ids), initial=done, unit="img", desc="encode images", disable=not progress)
    pending: list[torch.Tensor] = []
    shard_iter = iter(todo)
    current = next(shard_iter, None)
    for pixels, errors in loader:
        bad = next((e for e in errors if e), None)
        if bad:
            raise DataError(bad)
        x = images_to_input(pixels.to(device, non_blocking=True), encoder.mean, encoder.std)
        with autocast(device, precision):
            pending.append(model.encode_image(x).float().cpu())
        bar.update(len(pixels))
        if sum(len(p) for p in pending) == len(shards[current]):
            ids = [image_ids[r] for r in shards[current]]
            _write_shard(_shard_path(shard_dir, current), torch.cat(pending), fingerprint, ids)
            pending, current = [], next(shard_iter, None)
    bar.close()
    return torch.cat([load_file(str(_shard_path(shard_dir, k)))["features"] for k in range(len(shards))])


@torch.no_grad()
def encode_task_texts(
    encoder: ClipEncoder,
    tasks: Sequence[Task],
    prompts: Mapping[str, str],
    cache: str | Path,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: Precision = "fp32",
    progress: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Question features ``[Q, d]`` and each task's answer-prompt features ``[K, d]``, cached in ``cache``."""
    questions = [t.question for t in tasks]
    flat = [p for t in tasks for p in answer_prompts(t, prompts)]
    texts = questions + flat
    cache = Path(cache)
    fingerprint = _fingerprint(
        encoder, precision, {"texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    )
    feats = None
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                feats = f.get_tensor("features")
    if feats is None:
        model = encoder.model.to(device)
        feats = encode_texts(model, encoder.tokenizer, texts, batch_size, progress, "encode texts", precision)
        save_tensors(cache, {"features": feats}, {"fingerprint": fingerprint})
    answers = list(torch.split(feats[len(questions) :], [t.num_answers for t in tasks]))
    return feats[: len(questions)], answers


def preprocessing_info(encoder: ClipEncoder) -> dict:
    """The preprocessing as the manifest records it."""
    return {
        "description": PREPROCESSING,
        "image_size": encoder.image_size,
        "interpolation": "bicubic",
        "mean": list(encoder.mean),
        "std": list(encoder.std),
    }


def default_workers() -> int:
    """Image-decoding processes: all cores but one (decoding JPEGs is what limits a GPU run), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
