"""HyperCLIP: a weight encoder into the question-embedding space and its contrastive loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from meta_vqa.nets.hypernet import MLP


class WeightEncoder(nn.Module):
    """H_ω: flat adapter weights → question-embedding space (Softplus MLP, D → 128 → 128 → d_q).

    ``logit_scale`` is stored as a log; it is trained only when ``learn_scale`` is set (the authors created
    it but never optimised it) and always clamped to [1, 100].
    """

    def __init__(
        self,
        weight_dim: int,
        out_dim: int = 768,
        hidden: tuple[int, ...] = (128, 128),
        scale: float = 100.0,
        learn_scale: bool = False,
    ):
        super().__init__()
        self.mlp = MLP(weight_dim, list(hidden), out_dim, activation="softplus")
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def forward(self, w: Tensor) -> Tensor:
        """Unit-norm embeddings ``[B, d_q]`` of weights ``[B, D]``."""
        return F.normalize(self.mlp(w), dim=-1)


def gather_with_grad(x: Tensor, sizes: Sequence[int] | None = None) -> tuple[Tensor, int]:
    """All ranks' rows in rank order (the local ones keep their gradient) and this rank's offset;
    identity without DDP. ``sizes``: every rank's row count, when they differ (default: all alike)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = list(sizes) if sizes is not None else [x.shape[0]] * world
    width = max(sizes)
    padded = F.pad(x, (0, 0, 0, width - x.shape[0]))  # all_gather wants one shape on every rank
    parts = dist_fn.all_gather(padded)  # its backward sums every rank's gradient of our rows
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def contrastive_loss(
    u: Tensor,
    v: Tensor,
    scale: Tensor | float,
    gather: bool = True,
    sizes: Sequence[int] | None = None,
) -> Tensor:
    """Symmetric InfoNCE between unit weight embeddings ``u`` and unit question embeddings ``v`` ``[B, d]``.

    loss = ½ [CE(s·u vᵀ, diag) + CE(s·v uᵀ, diag)], the mean of both directions (open_clip; the authors
    summed them, which only doubles the loss). Under DDP every rank scores its rows against the gathered
    rows of all ranks (``sizes``: the row count of every rank, if they differ) and returns the mean over
    its own rows; the gather's backward brings every rank's gradient of those rows back, so with DDP's
    average (and the rank's weight when shares differ) the step equals one process on the whole batch.
    Computed in float32 under mixed precision.
    """
    with torch.autocast(u.device.type, enabled=False):
        u, v = u.float(), v.float()
        if gather:
            all_u, offset = gather_with_grad(u, sizes)
            all_v, _ = gather_with_grad(v, sizes)
        else:
            all_u, all_v, offset = u, v, 0
        labels = torch.arange(u.shape[0], device=u.device) + offset
        logits_uv = scale * u @ all_v.T
        logits_vu = scale * v @ all_u.T
        return 0.5 * (F.cross_entropy(logits_uv, labels) + F.cross_entropy(logits_vu, labels))
