"""The one place where Lightning's, torch's and jsonargparse's noise is silenced at its source.

What a run prints is ours: a header, one live progress line per phase (:mod:`meta_vqa.progress`), each
stage's results table and a footer. The messages below tell a user nothing about this project's runs:

* Lightning's start-up and bookkeeping lines (``GPU available: …``, ``TPU available: …``, ``💡 Tip: …``,
  ``Seed set to 0``, ``Restoring states from the checkpoint path …``, ``Trainer.fit stopped: max_steps
  reached``): its ``rank_zero`` info logger and the seed logger are raised to WARNING;
* warnings about choices made on purpose: frozen upstream modules in eval mode, in-memory data loaders
  without workers, a logging interval longer than a tiny epoch, a stage folder that already holds the
  pipeline's bookkeeping (``Checkpoint directory … exists and is not empty``), a checkpoint read from
  another folder than the stage's (``The dirpath has changed``), LightningCLI run from Python.

``META_VQA_VERBOSE=1`` keeps all of it (for debugging Lightning itself).
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category) of warnings that describe intended behaviour
WARNINGS = (
    r".*module\(s\) in eval mode.*",  # frozen upstream generators, the CLIP's locked text tower
    r".*does not have many workers.*",  # the task tensors live in memory
    r".*is smaller than the logging interval.*",  # tiny epochs of the smoke configs
    r".*Checkpoint directory .* exists and is not empty.*",  # the pipeline's stage.running.json is there
    r".*The dirpath has changed from .*",  # predict from an HNet checkpoint writes into another folder
    r".*args parameter is intended to run from within Python.*",  # run_stage calls LightningCLI
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)
LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # GPU/TPU/HPU lines, tips, fit stopped, restoring states
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",  # Seed set to N
    "lightning.pytorch.accelerators.cuda",  # LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES
)


def verbose() -> bool:
    return os.environ.get("META_VQA_VERBOSE", "").lower() in ("1", "true", "yes")


def quiet() -> None:
    """Silence the messages listed in this module's docstring (idempotent: call it where a command starts;
    the warning filters are added again each time, as tests reset them)."""
    if verbose():
        return
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
