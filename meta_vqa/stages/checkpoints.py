"""Reading a stage checkpoint a command is given: ``--ckpt_path``, ``model.init_args.upstream_ckpt``,
``hyperclip_ckpt``, ``generate --ckpt``, ``bench sample --ckpt``.

Every such file is checked before anything is created, in one place:

* it is a local file, given as a path or a ``file://`` URL (other URLs are refused: Lightning would fetch
  them and, for ``http``, unpickle them by default);
* ``torch.load`` reads it with ``weights_only=True``, passed explicitly so that no environment setting
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) turns unpickling on: a file holding pickled code is refused,
  never run;
* it is a Lightning checkpoint of one of our stages (``state_dict`` and ``hyper_parameters``), and of the
  stage the command expects (:func:`check_stage`).

Each failure is one :class:`~meta_vqa.errors.DataError` or :class:`~meta_vqa.errors.ConfigError` naming the
argument and the file.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from meta_vqa.errors import ConfigError, DataError

STAGE_PACKAGE = "meta_vqa.stages."
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def local_path(value: str | os.PathLike, key: str) -> Path:
    """The local file a checkpoint argument names: a path, or a ``file://`` URL turned into one."""
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{key}: empty (give a checkpoint file)")
    if text.startswith("file:"):
        url = urlparse(text)
        if url.netloc not in ("", "localhost"):
            raise ConfigError(f"{key} {text}: a file:// URL of another host; give a local path")
        return Path(unquote(url.path))
    if _URL.match(text):
        raise ConfigError(f"{key} {text}: only local checkpoint files are read (a path or a file:// URL)")
    return Path(text)


def read_checkpoint(value: str | os.PathLike, key: str = "checkpoint") -> tuple[Path, dict]:
    """``(path, checkpoint)`` of a stage checkpoint, loaded on the CPU with ``weights_only=True``.

    Raises one :class:`DataError` naming the file and ``key`` (the argument it was given as) if the file is
    missing, unreadable, holds pickled objects, or is not a Lightning checkpoint of a stage.
    """
    path = local_path(value, key)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found ({key})")
    if not path.is_file():
        raise DataError(f"{path}: not a checkpoint file ({key})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: an empty file, not a checkpoint ({key})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found:  # code or objects torch will not rebuild without running them
            what = f"a pickled {found.group(1)}, not plain weights"
            raise DataError(f"{path}: holds {what}; refusing to unpickle it ({key})") from None
        detail = _UNPICKLER.search(str(e))
        reason = detail.group(1).strip() if detail else "not a weights-only pickle"
        raise DataError(f"{path}: not a readable checkpoint ({reason}) ({key})") from None
    except Exception as e:  # truncated zip, empty file, text: torch raises many kinds
        raise DataError(f"{path}: not a readable checkpoint ({_reason(e)}) ({key})") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: not a Lightning checkpoint of a stage (a {type(ckpt).__name__}) ({key})")
    for field in ("state_dict", "hyper_parameters"):
        if not isinstance(ckpt.get(field), dict):
            raise DataError(f"{path}: not a Lightning checkpoint of a stage (no {field!r}) ({key})")
    return path, ckpt


def _reason(e: Exception) -> str:
    """The first sentence of an exception's message, with its type where the message alone is cryptic."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = text.split(". ")[0][:160]
    return first if len(first) >= 24 else f"{type(e).__name__}: {first}" if first else type(e).__name__


def stage_of(ckpt: dict) -> str | None:
    """The class path of the stage that wrote a checkpoint (None if it was not saved through the CLI)."""
    name = ckpt["hyper_parameters"].get("_class_path")
    return name if isinstance(name, str) else None


def check_stage(path: Path, ckpt: dict, expected: Sequence[str], key: str) -> None:
    """Refuse a checkpoint of another stage than one of ``expected`` (class paths; empty: any stage of ours).

    A checkpoint that records no stage passes here; loading its weights strictly catches a mismatch.
    """
    found = stage_of(ckpt)
    if found is None:
        return
    if expected and found not in expected:
        wanted = " or ".join(expected)
        raise ConfigError(f"{key} {path}: a {found} checkpoint, but this command expects {wanted}")
    if not found.startswith(STAGE_PACKAGE):
        raise ConfigError(f"{key} {path}: a {found} checkpoint, not one of a meta_vqa stage")


def check_weights(path: Path, ckpt_shapes: dict[str, tuple], model: torch.nn.Module, key: str) -> None:
    """The checkpoint's weights must fit ``model`` exactly (the strict load that follows would fail)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(ckpt_shapes))
    extra = sorted(set(ckpt_shapes) - set(own))
    cls = type(model).__name__
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {cls} does not"
        raise DataError(f"{key} {path}: its weights do not fit {cls} (it {what})")
    for k, shape in own.items():
        if ckpt_shapes[k] != shape:
            raise DataError(
                f"{key} {path}: its weights do not fit {cls} ({k!r} has shape {list(ckpt_shapes[k])}, "
                f"the model {list(shape)}; a model argument given on the command line changed its size?)"
            )
