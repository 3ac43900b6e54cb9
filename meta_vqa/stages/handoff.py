"""Stage hand-off: a downstream stage holds its frozen upstream stage as a submodule.

One entry point, :func:`attach_upstream`, used by every downstream stage, and one check that an adaptation
dataset belongs to the generator a stage trains on, :func:`check_adaptation`::

    self.upstream, record = attach_upstream(upstream_ckpt, upstream, expected=(HNetStage,))
    self.hparams["upstream"] = record

* Training from scratch (``upstream_ckpt`` set, no record): the checkpoint is read with
  ``weights_only=True`` (:func:`~meta_vqa.stages.checkpoints.read_checkpoint`), the upstream stage is rebuilt from its saved hyper-parameters, its weights are
  loaded strictly, it is frozen and kept in eval mode. The record (class path, hyper-parameters, sha256,
  path) goes into the downstream hyper-parameters.
* Restoring a downstream checkpoint (record present): the upstream is rebuilt from the record alone and
  its weights come from the downstream checkpoint's own state dict, so the upstream file is never read
  (it may be gone); ``upstream_ckpt`` is then ignored.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path

import lightning as L
from torch import nn

from meta_vqa.errors import ConfigError, DataError
from meta_vqa.io import sha256_file
from meta_vqa.stages.checkpoints import read_checkpoint

log = logging.getLogger(__name__)


class FrozenUpstream(nn.Module):
    """An upstream stage as a frozen submodule: no gradients, always in eval mode."""

    def __init__(self, module: L.LightningModule):
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenUpstream:
        return super().train(False)  # Lightning calls .train() on the whole model; stay in eval mode

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(name: str | None, expected: tuple[type, ...], where: str) -> type:
    """The expected class named ``name`` (only classes listed in ``expected`` are ever imported)."""
    if name is None:
        return expected[0]
    for cls in expected:
        if class_path(cls) == name:
            return cls
    wanted = " or ".join(class_path(c) for c in expected)
    raise ConfigError(f"{where}: a {name} checkpoint, expected {wanted}")


def build_upstream(
    record: dict, expected: tuple[type, ...], where: str = "model.upstream"
) -> L.LightningModule:
    """An upstream stage rebuilt from a record's class path and hyper-parameters (untrained weights)."""
    cls = _resolve(record.get("class_path"), expected, where)
    try:
        # an empty context: LightningCLI passes the *downstream* hyper-parameters to save_hyperparameters
        # through a context variable, which would otherwise leak into the nested upstream stage
        return contextvars.Context().run(cls, **record.get("hparams", {}))
    except TypeError as e:
        raise ConfigError(
            f"{where}: cannot rebuild {cls.__name__} from the recorded hyper-parameters ({e})"
        ) from None


def load_upstream(
    path: str | Path, expected: tuple[type, ...], key: str = "model.upstream_ckpt"
) -> tuple[L.LightningModule, dict]:
    """Rebuild and strictly load a stage from its checkpoint; returns ``(module, record)``."""
    path, ckpt = read_checkpoint(path, key)
    hparams = dict(ckpt["hyper_parameters"])
    name = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    record = {"class_path": name or class_path(expected[0]), "hparams": hparams, "path": str(path)}
    module = build_upstream(record, expected, where=f"{key} {path}")
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise DataError(
            f"{path}: weights do not match {type(module).__name__} ({str(e).splitlines()[0]}) ({key})"
        ) from None
    record["sha256"] = sha256_file(path)
    return module, record


def attach_upstream(
    upstream_ckpt: str | None,
    record: dict | None,
    expected: tuple[type, ...],
    key: str = "model.upstream_ckpt",
) -> tuple[FrozenUpstream, dict]:
    """The frozen upstream of a downstream stage and its record (see the module docstring)."""
    if record is not None:
        module = build_upstream(record, expected)  # weights follow from the downstream checkpoint
        if upstream_ckpt and upstream_ckpt != record.get("path"):
            log.info("%s=%s ignored: restoring the upstream recorded in the checkpoint", key, upstream_ckpt)
    elif upstream_ckpt is None:
        raise ConfigError(f"{key}: required (the upstream stage's checkpoint)")
    else:
        module, record = load_upstream(upstream_ckpt, expected, key)
        log.info(
            "upstream %s loaded from %s (sha256 %s…)",
            record["class_path"],
            record["path"],
            record["sha256"][:12],
        )
    return FrozenUpstream(module), record


def check_adaptation(data, source) -> None:
    """An adaptation dataset (:class:`~meta_vqa.data.latents.AdaptationData`) must hold latents of the
    HNet ``source`` (:class:`~meta_vqa.stages.generator.AdaptationSource`): the same latent size, and made
    from the same checkpoint file where both sha256 are known."""
    if data.latent_dim != source.latent_dim:
        raise DataError(
            f"{data.path}: latents have size {data.latent_dim}, but the HNet ({source.path}) has "
            f"latent_dim {source.latent_dim}"
        )
    made_by = data.upstream_sha256
    if made_by and source.sha256 and made_by != source.sha256:
        raise DataError(
            f"{data.path}: made from an HNet checkpoint with sha256 {made_by[:12]}…, but the generator's "
            f"HNet ({source.path}) has sha256 {source.sha256[:12]}…; make the adaptation dataset from it"
        )
