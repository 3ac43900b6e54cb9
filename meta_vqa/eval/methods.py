"""The method ids of the results, in one place: every stage, the pipeline and the report name methods here.

A result record's ``method`` is one of :data:`METHOD_ORDER` (the order of the tables). Guided methods are
``<generator>_<guidance>`` (e.g. ``hvae_hyperldm``); HyperLDM sampled together with the HyperCLIP gradient
is ``<generator>_combined``. Guided records also carry a ``control``: the task's own description
(``aligned``), another task's (``shuffled``) or none (``empty``).
"""

from __future__ import annotations

from typing import Literal, get_args

Variant = Literal["clip_zero_shot", "uncond_multitask", "cond_multitask", "cond_multitask_film", "mnet_maml"]
GeneratorKind = Literal["hnet", "hvae"]
Guidance = Literal["hyperclip", "hyperldm"]
Control = Literal["aligned", "shuffled", "empty"]

BASE_VARIANTS: tuple[str, ...] = get_args(Variant)
GENERATORS: tuple[str, ...] = get_args(GeneratorKind)
GUIDANCE: tuple[str, ...] = get_args(Guidance)
CONTROLS: tuple[str, ...] = get_args(Control)

HNET_MAML = "hnet_maml"
# HNet-MAML whose start latent reads the question (the hnet stage with condition: question), a baseline
COND_HNET_MAML = "cond_hnet_maml"
HVAE = "hvae"
HVAE_RECON = "hvae_recon"  # the HVAE's reconstruction of support-adapted HNet weights (a diagnostic row)


def guided_method(generator: str, guidance: str) -> str:
    """``hnet_hyperclip``, ``hvae_hyperldm``, ``hnet_combined`` (guidance ``combined``), ..."""
    return f"{generator}_{guidance}"


GUIDED: tuple[str, ...] = tuple(
    guided_method(g, k) for k in (*GUIDANCE, "combined") for g in GENERATORS
)  # hnet_hyperclip, hvae_hyperclip, hnet_hyperldm, hvae_hyperldm, hnet_combined, hvae_combined
# the unguided baselines a guided method must beat zero-shot (the paper's claim); cond_multitask and
# cond_hnet_maml read the question themselves, so they enter as candidates for the strongest baseline
BASELINES: tuple[str, ...] = ("uncond_multitask", "mnet_maml", HNET_MAML)
DIAGNOSTIC: tuple[str, ...] = (HVAE_RECON,)
METHOD_ORDER: tuple[str, ...] = (
    "chance",
    "majority",
    *BASE_VARIANTS,
    HNET_MAML,
    COND_HNET_MAML,
    HVAE,
    HVAE_RECON,
    *GUIDED,
)


def method_rank(method: str) -> int:
    """Position of a method in the tables (unknown ids last)."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
