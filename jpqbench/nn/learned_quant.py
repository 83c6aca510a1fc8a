"""The learned quantizer of GETA and DJPQ: learned step ``d``, range ``q_m`` and exponent ``t``.

One quantizer per tensor (a layer's weight, or a layer's input activation), three scalars::

    Q(x) = sign(x) * d * round(min(|x|, q_m)^t / d)          (signed: weights, signed inputs)
    Q(x) =           d * round(min(max(x, 0), q_m)^t / d)     (unsigned: inputs after a ReLU)

``t = 1`` is the linear variant (``learn_exponent=False`` keeps it at 1). The grid has
``n = round(q_m^t / d)`` positive levels, so the *continuous* bit width, the one that GETA
projects and DJPQ regularises, is::

    b = log2(q_m^t / |d| + 1) + 1        signed   (the sign costs one bit)
    b = log2(q_m^t / |d| + 1)            unsigned

and the step of a given bit width is ``d(b) = q_m^t / (2^(b-1) - 1)`` (unsigned:
``q_m^t / (2^b - 1)``). Upstream GETA applies the signed formula to activations too, which
spends a bit on a sign that post-ReLU inputs never use; here an input quantizer whose
calibration data has no negative value is unsigned (``signed=None`` decides at
initialisation), so a b-bit activation really uses its 2^b levels.

Gradients (``_LearnedQuantFn``), as in upstream GETA (after DJPQ, arXiv 2007.10463):

* x: straight-through -- 1 where ``|x| <= ste_clip`` (default: where ``|x| <= q_m``; upstream
  GETA passes gradients up to a fixed |x| <= 2), 0 elsewhere;
* d: ``sum g * sign(x) * (round(u) - u)`` with ``u = min(|x|, q_m)^t / d``;
* q_m: ``sum g * sign(x) * t * q_m^(t-1)`` over the clipped entries (``|x| > q_m``);
* t: ``sum g * sign(x) * v^t * ln v`` with ``v = min(|x|, q_m)``.

These are the exact gradients of the surrogate in which the rounding offset ``round(u) - u``
is held at its current value -- that is what tests/unit/test_learned_quant.py checks against
central finite differences in float64.

Initialisation (GETA): ``q_m = max|x|`` of the weight (of the calibration inputs for an
activation quantizer) and ``d = d(16)``, i.e. 16 bits. :meth:`LearnedQuantizer.freeze` fixes
the bit width: from then on ``d`` is *computed* as ``d(b)`` from the current ``q_m`` and ``t``
(which keep training), so the grid has exactly ``b`` bits at every step -- GETA's cool-down.

One integer-bit rule serves the count, the freeze and the plan: :attr:`LearnedQuantizer.bits`
is the integer bit width the current grid really needs (``ceil(log2(2n + 1))`` signed,
``ceil(log2(n + 1))`` unsigned), which is what the plan records, what the cost counter counts
and what the harness's plan checker verifies (at most ``2**bits`` distinct values); and
:meth:`~LearnedQuantizer.freeze` without an explicit width freezes at that same ``bits``. A
frozen b-bit grid has ``2**b - 1`` values (signed), so it still needs exactly ``b`` bits: what
was counted before the freeze is what is counted after it. (Rounding the continuous width
instead -- upstream GETA's ``round(bit_width)`` -- would freeze a 7.3-bit grid, which needs and
was counted at 8 bits, at 7, so a method that sized its pruning on the count would end below
its budget.) Helpers install the quantizers on the
compressible layers of a model (:func:`install_learned_quantizers`), calibrate the input
quantizers (:func:`calibrate_inputs`), and read or freeze all bit widths.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from jpqbench.nn.layers import CompressibleLayer, compressible_layers, make_compressible, observe_inputs

__all__ = ["LearnedQuantizer", "install_learned_quantizers", "calibrate_inputs", "learned_quantizers",
           "layer_bits", "freeze_all"]

_EPS = 1e-12


class _LearnedQuantFn(torch.autograd.Function):
    """Forward Q(x); straight-through for x, analytic gradients for d, q_m and t (t > 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor,
                signed: bool, ste_clip: float | None) -> torch.Tensor:
        range_ = q_m.abs()
        magnitude = x.abs() if signed else x.clamp_min(0)
        v = torch.minimum(magnitude, range_)
        v_t = v if float(t) == 1.0 else v.pow(t)  # the linear variant skips the power
        u = v_t / d
        levels = torch.round(u)
        out = d * levels
        if signed:
            out = out * torch.sign(x)
        ctx.save_for_backward(x, d, q_m, t, v, v_t, u, levels)
        ctx.signed, ctx.ste_clip = signed, ste_clip
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, q_m, t, v, v_t, u, levels = ctx.saved_tensors
        need_x, need_d, need_qm, need_t = ctx.needs_input_grad[:4]
        range_ = q_m.abs()
        magnitude = x.abs() if ctx.signed else x
        grad_x = grad_d = grad_qm = grad_t = None
        if need_x:
            clip = range_ if ctx.ste_clip is None else ctx.ste_clip
            passes = magnitude <= clip
            if not ctx.signed:
                passes = passes & (x >= 0)
            grad_x = grad * passes
        # sign(x) for signed inputs; for unsigned ones the entries with x <= 0 have v = 0 and
        # contribute nothing below except to d, where round(0) - 0 = 0 as well
        signed_grad = grad * torch.sign(x) if ctx.signed else grad
        if need_d:
            grad_d = (signed_grad * (levels - u)).sum().reshape(d.shape)
        if need_qm:
            clipped = torch.where(magnitude > range_, signed_grad, 0).sum()
            grad_qm = (clipped * t * range_.clamp_min(_EPS).pow(t - 1) * torch.sign(q_m)).reshape(q_m.shape)
        if need_t:
            grad_t = (signed_grad * torch.xlogy(v_t, v)).sum().reshape(t.shape)
        return grad_x, grad_d, grad_qm, grad_t, None, None


class LearnedQuantizer(nn.Module):
    """Per-tensor quantizer with learned step ``d``, range ``q_m`` and exponent ``t``.

    Args:
        signed: True for weights and inputs that can be negative; False for post-ReLU
            inputs; None decides at initialisation (unsigned iff the data has no negative value).
        learn_exponent: learn ``t`` (GETA's non-linear variant, upstream's default); False keeps
            ``t = 1`` (the linear variant).
        init_bits: bit width at initialisation (GETA: 16).
        ste_clip: the straight-through estimator passes x's gradient where ``|x| <= ste_clip``;
            None means where ``|x| <= q_m``.

    The quantizer initialises itself from the first tensor it sees in training mode (or from
    :meth:`initialize`); in eval mode an uninitialised quantizer raises rather than pass floats.
    """

    def __init__(self, signed: bool | None = True, learn_exponent: bool = True, init_bits: int = 16,
                 ste_clip: float | None = None) -> None:
        super().__init__()
        if not 2 <= init_bits <= 32:
            raise ValueError(f"init_bits must be in [2, 32], got {init_bits}")
        self.auto_sign = signed is None
        self.init_bits = int(init_bits)
        self.ste_clip = ste_clip
        self.d = nn.Parameter(torch.tensor(1.0))
        self.q_m = nn.Parameter(torch.tensor(1.0))
        self.t = nn.Parameter(torch.tensor(1.0), requires_grad=learn_exponent)
        self.register_buffer("signed", torch.tensor(bool(signed) if signed is not None else True))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frozen_bits", torch.tensor(0.0))  # 0: not frozen

    def extra_repr(self) -> str:
        return (f"signed={bool(self.signed)}, learn_exponent={self.t.requires_grad}, "
                f"bits={self.bits if bool(self.initialized) else '?'}, frozen={self.frozen}")

    # ---- initialisation --------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """GETA's initialisation from a tensor: ``q_m = max|x|``, ``d = d(init_bits)``."""
        self.initialize_range(float(x.detach().abs().max()), float(x.detach().min()))

    @torch.no_grad()
    def initialize_range(self, abs_max: float, minimum: float) -> None:
        """Initialise from observed statistics (``max|x|`` and ``min x`` over calibration data)."""
        if self.auto_sign:
            self.signed.fill_(minimum < 0)
        self.q_m.fill_(max(abs_max, 1e-8))
        self.t.fill_(1.0)
        self.d.copy_(self.step_for_bits(self.init_bits))
        self.frozen_bits.fill_(0.0)
        self.initialized.fill_(True)

    # ---- the grid ----------------------------------------------------------------------
    def _range_pow(self) -> torch.Tensor:
        return torch.pow(self.q_m.abs().clamp_min(1e-8), self.t)

    def step_for_bits(self, bits: float | torch.Tensor) -> torch.Tensor:
        """``d(b)``: the step at which the current ``q_m`` and ``t`` give ``bits`` bits (differentiable)."""
        bits = torch.as_tensor(bits, dtype=self.q_m.dtype, device=self.q_m.device)
        levels = 2 ** (bits - 1) - 1 if bool(self.signed) else 2 ** bits - 1
        return self._range_pow() / levels

    def step(self) -> torch.Tensor:
        """The step the forward pass uses: ``d``, or ``d(frozen_bits)`` once frozen."""
        return self.step_for_bits(self.frozen_bits) if self.frozen else self.d

    def bit_width(self) -> torch.Tensor:
        """The continuous bit width ``log2(q_m^t / |d| + 1) (+ 1 if signed)`` (differentiable)."""
        width = torch.log2(self._range_pow() / self.step().abs().clamp_min(1e-30) + 1)
        return width + 1 if bool(self.signed) else width

    @property
    def bits(self) -> int:
        """Integer bit width of the current grid: enough bits for all of its levels."""
        with torch.no_grad():
            n = float(torch.round(self._range_pow() / self.step().abs().clamp_min(1e-30)))
        values = 2 * n + 1 if bool(self.signed) else n + 1
        return max(1, math.ceil(math.log2(values) - 1e-9))

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_bits > 0)

    # ---- what GETA's optimizer does to d -----------------------------------------------
    @torch.no_grad()
    def project(self, low_bits: float, high_bits: float) -> None:
        """Clamp ``d`` into ``[d(high_bits), d(low_bits)]``, i.e. the bit width into [low, high]."""
        self.d.clamp_(min=float(self.step_for_bits(high_bits)), max=float(self.step_for_bits(low_bits)))

    @torch.no_grad()
    def freeze(self, bits: int | None = None) -> None:
        """Fix the bit width; ``d`` follows ``q_m`` and ``t`` from then on.

        The default is :attr:`bits`, the integer width the current grid needs and the one the plan
        and the cost counter already count, so freezing never changes the counted cost (see the
        module docstring: one rule for count and freeze).
        """
        bits = self.bits if bits is None else int(bits)
        self.frozen_bits.fill_(max(bits, 1 if not bool(self.signed) else 2))
        self.d.copy_(self.step_for_bits(self.frozen_bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError("LearnedQuantizer used in eval mode before initialisation: call "
                                   "initialize() or run a training-mode batch first")
            self.initialize(x)
        return _LearnedQuantFn.apply(x, self.step(), self.q_m, self.t, bool(self.signed), self.ste_clip)


# ---- model-level helpers -------------------------------------------------------------

def install_learned_quantizers(model: nn.Module, weights: bool = True, activations: bool = False,
                               learn_exponent: bool = True, init_bits: int = 16,
                               weight_ste_clip: float | None = None) -> dict[str, CompressibleLayer]:
    """Give every conv/linear of ``model`` learned quantizers (made compressible first).

    Weight quantizers are signed and initialised from the weight at once. Input quantizers
    (``activations=True``) decide their sign at initialisation: call :func:`calibrate_inputs`
    (or run a training batch) before using the model in eval mode. Returns name -> layer.
    """
    make_compressible(model)
    layers = compressible_layers(model)
    for layer in layers.values():
        if weights:
            quantizer = LearnedQuantizer(True, learn_exponent, init_bits, weight_ste_clip)
            quantizer.initialize(layer.weight)
            layer.weight_quantizer = quantizer.to(layer.weight.device)
        if activations:
            layer.input_quantizer = LearnedQuantizer(None, learn_exponent, init_bits).to(layer.weight.device)
    return layers


@torch.no_grad()
def calibrate_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Initialise every learned input quantizer from ``max|x|`` and ``min x`` of its layer's input.

    The inputs are observed with all input quantizers bypassed (weights already quantized),
    in eval mode, over all ``batches``.
    """
    layers = {name: layer for name, layer in compressible_layers(model).items()
              if isinstance(layer.input_quantizer, LearnedQuantizer)}
    stats: dict[str, list[float]] = {name: [0.0, math.inf] for name in layers}

    def observe(name: str, layer: nn.Module, x: torch.Tensor) -> None:
        stats[name][0] = max(stats[name][0], float(x.abs().max()))
        stats[name][1] = min(stats[name][1], float(x.min()))

    observe_inputs(model, layers, batches, observe, bypass_input_quantizers=True)
    for name, layer in layers.items():
        if math.isinf(stats[name][1]):
            raise RuntimeError(f"layer {name} saw no input during calibration")
        layer.input_quantizer.initialize_range(*stats[name])


def learned_quantizers(model: nn.Module) -> dict[str, LearnedQuantizer]:
    """Every learned quantizer of ``model``, by module name (e.g. ``conv1.weight_quantizer``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LearnedQuantizer)}


def layer_bits(model: nn.Module) -> dict[str, dict[str, int]]:
    """Integer bit widths per compressible layer: ``{"w": ..., "a": ...}`` for its learned quantizers."""
    out: dict[str, dict[str, int]] = {}
    for name, layer in compressible_layers(model).items():
        entry = {}
        if isinstance(layer.weight_quantizer, LearnedQuantizer):
            entry["w"] = layer.weight_quantizer.bits
        if isinstance(layer.input_quantizer, LearnedQuantizer):
            entry["a"] = layer.input_quantizer.bits
        if entry:
            out[name] = entry
    return out


def freeze_all(model: nn.Module) -> None:
    """Freeze every learned quantizer at the integer bit width its grid needs (:attr:`LearnedQuantizer.bits`)."""
    for quantizer in learned_quantizers(model).values():
        quantizer.freeze()
