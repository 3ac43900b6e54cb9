"""A linear layer whose CPU forward reads its weight from a copy prepacked for oneDNN.

The hypernetwork's output layer turns a 128-wide code into the 394,240 weights of a task's adapter: its
forward pass is a thin product, ``[tasks, 128] × [128, 394,240]``, which the default CPU GEMM runs at about
half of this kind of machine's matmul rate. oneDNN, reading the weight in the blocked layout it reorders it
into, runs the same product about 1.5× faster at 32 rows (and faster at every row count from 1 to 100). The
weight changes only when an optimizer steps, while one meta-step passes through it 11 times (10 inner steps
and the outer pass) and the adaptation of the whole dataset hundreds of times, so the reordered copy is made
once per version of the weight, at its second forward pass (a layer read once per optimizer step never pays
for one), and kept until the weight changes in place or is replaced. A change is seen two ways: the tensor's
version counter, which in-place ops bump (``load_state_dict``, ``copy_``, the foreach and for-loop
optimizers), and a hook run after every ``torch.optim`` optimizer's step, which drops the copies of the
parameters it stepped: fused optimizers (``Adam(fused=True)``, which our configs use) write the weights
without bumping their version counters, so the counter alone would keep a stale copy. Writing a packed layer's
weight through ``.data`` is the one change neither sees; call :func:`forget` after it.

The backward pass is the ordinary one (``∂x = g W``, ``∂W = gᵀ x``, ``∂b = Σ g``, written with
differentiable ops, so second-order MAML can differentiate through it), and like PyTorch's own linear layer
it skips the weight and bias gradients when the running backward pass does not reach them: the inner loop
asks for the gradient with respect to the latents only, and the 50 M-entry weight gradient is then not
formed.

The packed path is taken on CPU, in float32, outside autocast, where this build of PyTorch has oneDNN and the
private operators it uses (they back ``torch.compile``'s CPU weight prepacking), and only for the row counts
at which it gives ``F.linear``'s result bit for bit. oneDNN's packed kernel and the default GEMM sum the same
products in the same order except for the thinnest inputs (on this kind of CPU: up to 3 rows at the
Meta-EasyVQA width, up to 5 at the paper's), where the default takes another route; which row counts agree is
measured once per weight shape in each process (:func:`exact_from`) on rows 1-16, 32 and 64, and any pass with
fewer rows than the smallest agreeing count runs ``F.linear``. So turning packing on or off does not move a
single bit of a run (a pass at 64 rows or more is taken to agree as the checked ones do; 65-512 rows agreed
when tried). This matters because HNet-MAML's training amplifies any difference in the order of float32
additions (two runs of one seed part after 50-100 meta-steps, and the zero-shot accuracy of the meta-learned
start latent on Meta-EasyVQA then falls in one of two groups, about 50 or about 60). On by default;
``META_VQA_PACKED_LINEAR=0`` turns it off. Only layers with at least ``MIN_WEIGHTS`` weights are packed: below
that, the reorder costs more than it saves.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

MIN_WEIGHTS = 1 << 20  # 4 MiB of float32: smaller layers keep nn.Linear's forward
PACK_ROWS = 32  # the row count oneDNN lays the packed copy out for (the speed hardly depends on it)
CHECK_ROWS = (*range(1, 17), 32, 64)  # row counts at which exact_from compares the two paths

_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (its version, the packed copy)
_AVAILABLE: bool | None = None
_EXACT_FROM: dict[tuple[int, int], int | None] = {}  # (out, in) -> smallest row count packed exactly


def _self_check() -> bool:
    """Whether oneDNN's packed linear is here and gives ``F.linear``'s values on a small case."""
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 16), (24, 16), (24,)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        _ = torch._C._will_engine_execute_node, torch.autograd.graph._get_grad_fn_or_grad_acc
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


def requested() -> bool:
    """Whether the environment allows the packed path (on unless ``META_VQA_PACKED_LINEAR`` is ``0``,
    ``false``, ``no`` or ``off``)."""
    return os.environ.get("META_VQA_PACKED_LINEAR", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the packed path can be used in this process: :func:`requested`, and oneDNN's packed linear
    present and correct here (checked once)."""
    global _AVAILABLE
    if not requested():
        return False
    if _AVAILABLE is None:
        _AVAILABLE = torch.backends.mkldnn.is_available() and _self_check()
    return _AVAILABLE


def exact_from(weight: Tensor, bias: Tensor | None, packed: Tensor) -> int | None:
    """The smallest row count from which the packed pass equals ``F.linear`` bit for bit, for weights of
    this shape, or None where it never does: measured at the first call per shape (rows ``CHECK_ROWS``,
    inputs of a private generator, so the global random state is untouched) and remembered."""
    key = tuple(weight.shape)
    if key not in _EXACT_FROM:
        g = torch.Generator().manual_seed(0)
        w, b = weight.detach(), None if bias is None else bias.detach()
        bad = []
        with torch.no_grad(), torch.inference_mode(False):
            for rows in CHECK_ROWS:
                x = torch.randn(rows, w.shape[1], generator=g)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
                if not torch.equal(y, F.linear(x, w, b)):
                    bad.append(rows)
        top = max(bad, default=0)
        _EXACT_FROM[key] = None if top >= CHECK_ROWS[-1] else top + 1
    return _EXACT_FROM[key]


def packed_weight(weight: Tensor, rows: int) -> Tensor | None:
    """oneDNN's packed copy of ``weight`` ``[out, in]``, or None (``rows``: the rows of the pass asking).

    None at the first forward pass of a version of the weight: the copy is made at the second pass of the
    same version and kept until the weight changes in place or is replaced (the old copy is freed first).
    A layer read once per optimizer step (the HVAE's decoder, a trained hypernetwork's plain training step)
    so never pays for a reorder it would not win back; a meta-step, which reads it 11 times, packs it once.
    """
    key = (weight._version, weight.data_ptr(), tuple(weight.shape))
    hit = _PACKS.get(weight)
    if hit is None or hit[0] != key:
        _PACKS[weight] = (key, None)  # the first pass of this version (an older copy is dropped)
        return None
    if hit[1] is None:
        with torch.no_grad(), torch.inference_mode(False):
            _PACKS[weight] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
    return _PACKS[weight][1]


def forget(weight: Tensor) -> None:
    """Drop the packed copy of ``weight`` (it is made again at the next forward pass)."""
    _PACKS.pop(weight, None)


def _forget_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step: drop the packed copies of the parameters it may have changed."""
    if len(_PACKS) == 0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            _PACKS.pop(p, None)


# process-wide: an optimizer built anywhere (Lightning's, a user's loop) keeps the copies current
_STEP_HOOK = register_optimizer_step_post_hook(_forget_stepped)


def _reached(t: Tensor) -> bool:
    """Whether the running backward pass will use the gradient of ``t`` (it always may where that cannot
    be told)."""
    try:
        node = torch.autograd.graph._get_grad_fn_or_grad_acc(t)
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return True


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        gx = g.mm(weight) if need_x else None
        gw = g.t().mm(x) if need_w and _reached(weight) else None
        gb = g.sum(0) if bias is not None and need_b and _reached(bias) else None
        return gx, gw, gb, None


class PackedLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose CPU float32 forward reads a packed copy of
    its weight (see the module docstring); anywhere else it is ``nn.Linear``."""

    def packs(self, x: Tensor) -> bool:
        """Whether a forward pass on ``x`` takes the packed path (here, now: device, dtype, autocast)."""
        w = self.weight
        return (
            x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and w.layout == torch.strided
            and x.numel() > 0
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and available()
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.packs(x):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        copy = packed_weight(self.weight, flat.shape[0])
        if copy is None:
            return F.linear(x, self.weight, self.bias)
        lowest = exact_from(self.weight, self.bias, copy)
        if lowest is None or flat.shape[0] < lowest:  # here the packed kernel would sum in another order
            return F.linear(x, self.weight, self.bias)
        y = _PackedLinearFn.apply(flat, self.weight, self.bias, copy)
        return y.reshape(*x.shape[:-1], self.out_features)


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A ``PackedLinear`` where the layer is large enough for packing to pay (``MIN_WEIGHTS``), else an
    ``nn.Linear``; the two have the same parameters and state dict."""
    cls = PackedLinear if in_features * out_features >= MIN_WEIGHTS else nn.Linear
    return cls(in_features, out_features)
