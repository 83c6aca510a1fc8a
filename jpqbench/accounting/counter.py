"""The one cost counter. Every figure in every table comes from here.

Conventions (the same for every method and baseline):

* Only convolutions and linear layers cost MACs. BN (folded into the preceding conv at
  export), activations, pooling and residual additions are not counted -- the convention
  of the BOPs papers (DJPQ, GETA) and of ``torch.utils.flop_counter`` for convs.
* ``MACs`` of a conv = H_out * W_out * k_h * k_w * (kept input channels of the group) per
  kept output channel; a linear layer is a 1x1 conv on a 1x1 map. Grouped and depthwise
  convs count each output channel against the input channels of its own group.
* **Pruning propagates**: an input channel is dead when every layer that writes to it has
  pruned the matching output channel (through BN, ReLU, pooling, residual adds and flatten).
  Liveness is found by a *positive probe*: a forward pass of a copy of the model in which
  every conv/linear has positive weights masked by the plan, BN is the identity and the
  input is positive, so a value is zero exactly when it is structurally pruned (sums of
  positives cannot cancel). Ops that turn zero into non-zero (a sigmoid, say) make the
  channel count as alive -- the counter never under-counts.
* ``BOPs = sum over kept output channels of MACs_c * b_w(c) * b_a`` with ``b_a`` the bit width
  of the layer's *input*; floating point counts as 32 bits, so the FP32 model has
  BOPs = MACs * 32 * 32. The first layer's input is counted at the plan's ``a_bits`` like
  every other layer (no free 8-bit image input).
* ``weight_bits`` = sum over kept weights of their bit width, plus 32 bits per kept bias.
  ``relative_size`` divides by the FP32 model's weight bits (all weights and biases at 32).
* ``params`` counts conv/linear weights and biases of the dense model; ``kept_params`` those
  left after structured pruning (dead inputs included); ``nonzero_params`` also removes the
  plan's unstructured sparsity.
* ``activation_bits_peak`` = largest single layer input, in bits (alive input channels x
  H_in x W_in x a_bits, less unstructured activation sparsity).

Unstructured sparsity is *not* taken out of ``macs``/``bops``/``weight_bits`` (all dense);
the sparse-aware figures are separate fields, never mixed into those:

* ``weight_sparsity`` / ``activation_sparsity`` -- the plan's claimed unstructured sparsity,
  averaged over all kept conv/linear weights (biases excluded) and over all alive layer-input
  elements. Claimed activation sparsity means zeros the plan guarantees on *every* input (a
  static mask); the data-dependent zeros (ReLU) are measured on data by
  :func:`measure_activation_sparsity`, not counted here.
* ``sparse_bops`` = sum over layers of ``bops_layer * (1 - w_sparsity) * (1 - a_sparsity)``:
  a MAC is skipped when either operand is zero, assuming weight and activation zeros are
  independent and evenly spread over the receptive fields (exact for weight sparsity alone,
  an estimate with activation sparsity).
* ``sparse_weight_bits`` -- weight memory of a sparse storage format: each layer is stored in
  the smaller of dense (as ``weight_bits``) and **bitmap** format, in which every kept weight
  position costs 1 bit of the bitmap and every non-zero weight its ``b_w`` bits; biases stay
  dense at 32 bits. ``relative_sparse_size`` divides by the FP32 model's weight bits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from jpqbench.accounting.plan import CompressionPlan, LayerPlan
from jpqbench.nn.layers import cpu_copy, observe_inputs, quantized_input
from jpqbench.nn.quant import FLOAT_BITS


@dataclass
class LayerShape:
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel_area: int
    in_pixels: int  # H_in * W_in (positions for linear)
    out_pixels: int  # H_out * W_out (positions for linear)
    has_bias: bool


@dataclass
class CostReport:
    macs: float
    bops: float
    weight_bits: float
    params: int
    kept_params: int
    nonzero_params: int
    activation_bits_peak: float
    dense_macs: float
    dense_bops: float
    dense_weight_bits: float
    sparse_bops: float
    sparse_weight_bits: float
    weight_sparsity: float
    activation_sparsity: float

    @property
    def relative_bops(self) -> float:
        return self.bops / self.dense_bops

    @property
    def relative_size(self) -> float:
        return self.weight_bits / self.dense_weight_bits

    @property
    def weight_size_kb(self) -> float:
        return self.weight_bits / 8 / 1000

    @property
    def relative_sparse_bops(self) -> float:
        return self.sparse_bops / self.dense_bops

    @property
    def relative_sparse_size(self) -> float:
        return self.sparse_weight_bits / self.dense_weight_bits

    def relative(self, metric: str) -> float:
        return {"bops": self.relative_bops, "size": self.relative_size}[metric]

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.update(relative_bops=self.relative_bops, relative_size=self.relative_size,
                   weight_size_kb=self.weight_size_kb, relative_sparse_bops=self.relative_sparse_bops,
                   relative_sparse_size=self.relative_sparse_size)
        return out


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def _probe(model: nn.Module, input_shape: tuple[int, ...], plan: CompressionPlan | None
           ) -> tuple[dict[str, LayerShape], dict[str, torch.Tensor]]:
    """Shapes of every conv/linear, and which of its input channels are alive under ``plan``."""
    probe = cpu_copy(model).eval()  # counted on the CPU, wherever the run trains
    layers = _layers(probe)
    shapes: dict[str, LayerShape] = {}
    alive: dict[str, torch.Tensor] = {}
    hooks = []

    def conv_linear_hook(name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            alive[name] = (x.movedim(1, 0).reshape(x.shape[1], -1) != 0).any(dim=1)
            weight = torch.ones_like(module.weight)
            if plan is not None and name in plan.layers:
                weight = weight * plan.layers[name].kept_mask().view(-1, *([1] * (weight.dim() - 1))).float()
            if isinstance(module, nn.Conv2d):
                out = nn.functional.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
                shapes[name] = LayerShape("conv", module.in_channels, module.out_channels, module.groups,
                                          module.kernel_size[0] * module.kernel_size[1], x.shape[2] * x.shape[3],
                                          out.shape[2] * out.shape[3], module.bias is not None)
            else:
                out = nn.functional.linear(x, weight)
                positions = x.numel() // x.shape[0] // x.shape[-1]
                shapes[name] = LayerShape("linear", module.in_features, module.out_features, 1, 1,
                                          positions, positions, module.bias is not None)
            return out / out.detach().abs().amax().clamp_min(1e-30)  # keep magnitudes bounded
        return hook

    for name, module in layers.items():
        hooks.append(module.register_forward_hook(conv_linear_hook(name)))
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_hook(lambda mod, args, out: args[0]))
        # A module whose run-time zeros the probe's signal cannot show (an activation mask behind
        # a BN shift, a value grid that truncates a small signal) says where its output is
        # surely zero: `structural_forward(x)` is non-zero wherever the output may be.
        if hasattr(module, "structural_forward"):
            hooks.append(module.register_forward_hook(lambda mod, args, out: mod.structural_forward(args[0])))
    try:
        probe(torch.ones(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    missing = set(layers) - set(shapes)
    if missing:
        raise RuntimeError(f"layers never called in a forward pass: {sorted(missing)}")
    return shapes, alive


def input_liveness(model: nn.Module, input_shape: tuple[int, ...], plan: CompressionPlan) -> dict[str, torch.Tensor]:
    """Per conv/linear layer, a bool vector over its input channels: True = alive under ``plan``."""
    return _probe(model, input_shape, plan)[1]


def _layer_cost(shape: LayerShape, claim: LayerPlan, alive_in: torch.Tensor) -> dict[str, float]:
    in_per_group = shape.in_channels // shape.groups
    out_per_group = shape.out_channels // shape.groups
    alive_per_group = alive_in.view(shape.groups, in_per_group).sum(dim=1)
    bits = claim.channel_bits()
    macs = bops = weight_bits = kept = weights = bias_bits = bitmap_bits = 0.0
    for channel, b_w in enumerate(bits):
        if b_w == 0:
            continue
        fan_in = int(alive_per_group[channel // out_per_group]) * shape.kernel_area
        channel_macs = fan_in * shape.out_pixels
        macs += channel_macs
        bops += channel_macs * b_w * claim.a_bits
        weight_bits += fan_in * b_w + (FLOAT_BITS if shape.has_bias else 0)
        bias_bits += FLOAT_BITS if shape.has_bias else 0
        bitmap_bits += fan_in * (1 + (1 - claim.w_sparsity) * b_w)
        kept += fan_in + (1 if shape.has_bias else 0)
        weights += fan_in
    kept_inputs = int(alive_in.sum()) * shape.in_pixels
    return {"macs": macs, "bops": bops, "weight_bits": weight_bits, "kept_params": kept,
            "nonzero_params": kept * (1 - claim.w_sparsity),
            "activation_bits": kept_inputs * claim.a_bits * (1 - claim.a_sparsity),
            "sparse_bops": bops * (1 - claim.w_sparsity) * (1 - claim.a_sparsity),
            "sparse_weight_bits": min(weight_bits, bitmap_bits + bias_bits),
            "weights": weights, "zero_weights": weights * claim.w_sparsity,
            "inputs": kept_inputs, "zero_inputs": kept_inputs * claim.a_sparsity}


def count(model: nn.Module, input_shape: tuple[int, ...], plan: CompressionPlan | None = None) -> CostReport:
    """Cost of ``model`` (shapes only; weights are not read) compressed as ``plan`` says.

    ``plan=None`` counts the dense FP32 model. Layers missing from the plan count as FP32.
    ``input_shape`` is one sample without the batch dimension, e.g. ``(3, 32, 32)``.
    """
    dense_plan = CompressionPlan.dense(model)
    plan = plan or dense_plan
    unknown = set(plan.layers) - set(dense_plan.layers)
    if unknown:
        raise ValueError(f"plan names layers the model does not have: {sorted(unknown)}")
    shapes, alive = _probe(model, input_shape, plan)
    totals = dict.fromkeys(["macs", "bops", "weight_bits", "kept_params", "nonzero_params", "sparse_bops",
                            "sparse_weight_bits", "weights", "zero_weights", "inputs", "zero_inputs"], 0.0)
    dense = dict.fromkeys(["macs", "bops", "weight_bits"], 0.0)
    params, peak = 0, 0.0
    for name, shape in shapes.items():
        layer = _layer_cost(shape, plan.layers.get(name, dense_plan.layers[name]), alive[name])
        for key in totals:
            totals[key] += layer[key]
        peak = max(peak, layer["activation_bits"])
        # in the dense model every input channel is alive: the positive probe cannot zero one
        full = _layer_cost(shape, dense_plan.layers[name], torch.ones(shape.in_channels, dtype=torch.bool))
        for key in dense:
            dense[key] += full[key]
        params += int(full["kept_params"])
    return CostReport(macs=totals["macs"], bops=totals["bops"], weight_bits=totals["weight_bits"],
                      params=params, kept_params=int(totals["kept_params"]),
                      nonzero_params=round(totals["nonzero_params"]), activation_bits_peak=peak,
                      dense_macs=dense["macs"], dense_bops=dense["bops"], dense_weight_bits=dense["weight_bits"],
                      sparse_bops=totals["sparse_bops"], sparse_weight_bits=totals["sparse_weight_bits"],
                      weight_sparsity=totals["zero_weights"] / max(totals["weights"], 1.0),
                      activation_sparsity=totals["zero_inputs"] / max(totals["inputs"], 1.0))


@torch.no_grad()
def measure_activation_sparsity(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Fraction of exact zeros in every conv/linear layer's input, measured on ``batches`` in eval mode.

    The input is taken after the layer's ``input_quantizer`` (what the layer multiplies), so
    it counts every zero a zero-skipping accelerator would see: static masks, pruned channels,
    ReLU zeros and values that quantize to zero. A measurement on data, unlike the counted
    (claimed) ``activation_sparsity``; the runner measures it on the test split.
    """
    layers = _layers(model)
    zeros = dict.fromkeys(layers, 0)
    total = dict.fromkeys(layers, 0)

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = quantized_input(module, x)
        zeros[name] += int((x == 0).sum())
        total[name] += x.numel()

    observe_inputs(model, layers, batches, record)
    return {name: zeros[name] / total[name] for name in layers if total[name]}
