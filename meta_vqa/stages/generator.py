"""The latent-generator interface: what HNet-MAML and the HVAE offer to the stages built on them.

A generator decodes a latent into flat adapter weights. The HNet-MAML stage decodes its own latents
with its hypernetwork; the HVAE stage decodes the VAE's latents with the VAE's decoder (on top of its own
frozen HNet). Guidance stages (HyperCLIP, HyperLDM) and ``meta-vqa generate`` use only this interface,
never the concrete class.

The adaptation dataset always holds *HNet* latents. A generator maps them into its own latent space
(:meth:`LatentGenerator.from_adaptation`): the identity for the HNet, a stochastic encoding of the weights
they produce for the HVAE (the authors' ``train_on_vae`` route). Training and sampling of a guidance stage
therefore use the same latent space by construction; the authors' code could train a diffusion model on
HNet latents and decode its samples with the HVAE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from meta_vqa.data.adaptation import AdaptationBatch
from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.latents import LatentBatch
from meta_vqa.errors import ConfigError
from meta_vqa.eval.methods import GeneratorKind
from meta_vqa.eval.protocol import fine_tune, query_accuracy
from meta_vqa.meta.maml import Budget, InnerLoop
from meta_vqa.nets.adapter import ResidualAdapter
from meta_vqa.stages.common import grad_enabled
from meta_vqa.stages.distributed import GlobalBatch

# (a batch of adaptation latents, its place in the global batch) -> generator latents
TrainingLatents = Callable[[LatentBatch, GlobalBatch], Tensor]


@dataclass(frozen=True)
class AdaptationSource:
    """The HNet whose latents an adaptation dataset must hold to suit a generator."""

    latent_dim: int
    sha256: str | None  # of the HNet checkpoint file (None: unknown)
    path: str | None


class LatentGenerator:
    """Mixin of the generator stages. Subclasses provide ``kind``, ``adapter``, :attr:`latent_dim`,
    :attr:`eval_loop`, :meth:`weights`, :meth:`init_latents`, :meth:`from_adaptation`,
    :meth:`training_latents` and :meth:`adaptation_source`; the support fine-tuning and query scoring
    below are shared."""

    kind: ClassVar[GeneratorKind]
    adapter: ResidualAdapter
    conditional: bool = False  # a start latent that reads the question (Conditional HNet-MAML)
    budget: Budget = Budget()  # memory budget of the batched fine-tuning passes

    @property
    def latent_dim(self) -> int:
        raise NotImplementedError

    @property
    def eval_loop(self) -> InnerLoop:
        """The fine-tuning loop of few-shot evaluation in this latent space."""
        raise NotImplementedError

    def weights(self, z: Tensor) -> Tensor:
        """Flat adapter weights ``[B, D]`` of latents ``[B, d]``."""
        raise NotImplementedError

    def init_latents(self, task: Tensor) -> Tensor:
        """The zero-shot (start) latent of each task ``[B, d]``."""
        raise NotImplementedError

    def start_latents(self, batch: TaskBatch) -> Tensor:
        """Each task's start latent ``[B, d]``, where support fine-tuning begins: :meth:`init_latents`
        unless the generator's start reads the task's question (Conditional HNet-MAML)."""
        return self.init_latents(batch.task)

    def weight_map(self) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor] | None:
        """``(features, a, b)`` with ``weights(z) = features(z) @ aᵀ + b`` (``a`` [D, r]) when the generator
        ends in an affine layer, so a consumer of the weights can fold that layer into its own first one
        (HyperCLIP guidance); None otherwise."""
        return None

    def from_adaptation(self, hnet_latents: Tensor) -> Tensor:
        """Adaptation-dataset (HNet) latents ``[N, d_hnet]`` in this generator's latent space."""
        raise NotImplementedError

    def training_latents(self, latents: Tensor) -> TrainingLatents:
        """A sampler of training latents in this space for batches of the adaptation dataset whose
        latents are ``latents`` ``[E, T, d_hnet]`` (precomputes what it can, once); random draws are made
        for the whole global batch (:meth:`GlobalBatch.draw`)."""
        raise NotImplementedError

    def adaptation_source(self, record: dict) -> AdaptationSource:
        """Which HNet made the adaptation datasets this generator reads; ``record`` is the hand-off record
        under which this generator was loaded (its checkpoint's path and sha256)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------
    def support_latents(self, batch: TaskBatch, loop: InnerLoop | None = None) -> Tensor:
        """Each task's start latent fine-tuned on its support split (detached), in the batch's order."""
        init = self.start_latents(batch)
        return fine_tune(self.adapter, batch, init, loop or self.eval_loop, self.weights, budget=self.budget)

    def adapted_latents(self, batch: TaskBatch) -> Tensor:
        """Support-adapted latents made the way the guidance stages' training latents are: the HNet's
        support adaptation, mapped into this space by :meth:`from_adaptation` (the HNet: its own
        :meth:`support_latents`)."""
        return self.support_latents(batch)

    def query_accuracy(self, z: Tensor, batch: TaskBatch) -> Tensor:
        """Per-task query accuracy (%) of the weights of latents ``z``."""
        return query_accuracy(self.adapter, batch, z, self.weights, self.budget)

    def predict_step(self, batch: TaskBatch | AdaptationBatch, batch_idx: int) -> dict:
        """Latents adapted on each task's support split: ``{"task", "latent", "question"}``.

        An :class:`AdaptationBatch` (a job of the adaptation dataset) brings its own SGD loop; a plain
        task batch uses the few-shot loop.
        """
        if isinstance(batch, AdaptationBatch):
            tasks, loop = batch.tasks, InnerLoop(batch.steps, batch.lr, True)
        else:
            tasks, loop = batch, self.eval_loop
        with grad_enabled(tasks) as b:
            z = self.support_latents(b, loop)
        return {"task": tasks.task, "latent": z, "question": tasks.question}


def require_unconditional(gen: LatentGenerator, where: str) -> None:
    """The HVAE and the guidance stages build on the unconditional HNet: their zero-shot start is z0 and
    their training latents are adaptations from it; a Conditional HNet-MAML is a baseline of its own."""
    if gen.conditional:
        raise ConfigError(
            f"{where}: a Conditional HNet-MAML checkpoint (condition: question); the HVAE and the guidance "
            "stages build on the unconditional HNet (condition: none)"
        )
