"""Encoding with an open_clip model: images, questions and answer prompts into the feature store.

Features are the raw (un-normalised) float32 outputs of ``encode_image`` / ``encode_text``, as the
authors stored them.
Images are decoded once into a uint8 tensor; the model input is that tensor scaled and normalised, which
equals the PIL preprocessing of :func:`meta_vqa.nets.clip.build_preprocess` for images already at the
model's resolution (checked by a test), and is far faster than a per-image transform.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from meta_vqa.data.features import write_features
from meta_vqa.data.tasks import Task, fill_prompt
from meta_vqa.device import Precision, autocast
from meta_vqa.errors import DataError

log = logging.getLogger(__name__)


def load_images(paths: Mapping[str, str | Path], image_size: int, progress: bool = True) -> torch.Tensor:
    """Decode images as RGB into a uint8 tensor ``[N, 3, S, S]`` in the order of ``paths``.

    Images of another size are resized whole with bicubic interpolation (no crop), like the preprocessing.
    """
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, (image_id, path) in enumerate(tqdm(paths.items(), desc="images", disable=not progress)):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot read image {image_id!r} ({e})") from None
        out[i] = pixels.view(image_size, image_size, 3).permute(2, 0, 1)
    return out


def images_to_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixel values 0..255 ``[B, 3, H, W]`` (uint8 or float) → the normalised input of the image tower."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    progress: bool = True,
) -> torch.Tensor:
    """Raw ``encode_image`` features ``[N, d]`` (float32, CPU) of uint8 images, in batches."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode images", disable=not progress):
        x = images_to_input(images[start : start + batch_size].to(device), mean, std)
        chunks.append(model.encode_image(x).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "encode texts",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """Raw ``encode_text`` features ``[T, d]`` (float32, CPU), in batches; duplicates are encoded once.

    ``precision``: autocast of the forward pass (the features are stored in float32 either way).
    """
    model.eval()
    device = next(model.parameters()).device
    unique = list(dict.fromkeys(texts))
    chunks = []
    for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=not progress):
        tokens = tokenizer(unique[start : start + batch_size]).to(device)
        with autocast(device, precision):
            chunks.append(model.encode_text(tokens).float().cpu())
    if not chunks:
        return torch.empty(0, 0)
    feats = torch.cat(chunks)
    row = {t: i for i, t in enumerate(unique)}
    return feats[torch.tensor([row[t] for t in texts], dtype=torch.long)]


def answer_prompts(task: Task, prompts: Mapping[str, str]) -> list[str]:
    """The filled answer prompts of one task, in the order of its ``"answers"``."""
    if task.question not in prompts:
        raise DataError(f"no prompt template for task {task.question!r}")
    return [fill_prompt(prompts[task.question], a) for a in task.answers]


def encode_dataset(
    root: str | Path,
    encoder: str,
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    image_ids: Sequence[str],
    images: torch.Tensor,
    tasks: Sequence[Task],
    prompts: Mapping[str, str],
    mean: Sequence[float],
    std: Sequence[float],
    progress: bool = True,
) -> dict:
    """Encode images, questions and answer prompts and write them with :func:`write_features`.

    Every image a task uses must be among ``image_ids``. Returns the dimensions and counts written.
    """
    known = set(image_ids)
    for t in tasks:
        for img, _ in t.support + t.query:
            if img not in known:
                raise DataError(f"task {t.question!r}: image {img!r} has no pixels to encode")
    image_features = encode_images(model, images, mean, std, progress=progress)
    questions = [t.question for t in tasks]
    question_features = encode_texts(model, tokenizer, questions, progress=progress, desc="encode questions")
    flat = [p for t in tasks for p in answer_prompts(t, prompts)]
    flat_features = encode_texts(model, tokenizer, flat, progress=progress, desc="encode answers")
    answer_features = list(torch.split(flat_features, [t.num_answers for t in tasks]))
    write_features(
        root,
        encoder,
        list(image_ids),
        image_features,
        questions,
        question_features,
        [list(t.answers) for t in tasks],
        answer_features,
    )
    info = {
        "dim": int(image_features.shape[1]),
        "question_dim": int(question_features.shape[1]),
        "images": len(image_ids),
        "questions": len(questions),
        "answer_prompts": len(flat),
    }
    log.info("encoded %(images)d images, %(questions)d questions, %(answer_prompts)d answer prompts", info)
    return info
