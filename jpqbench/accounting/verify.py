"""Plan verification: a method's plan must tell the truth about the model it returns.

Because methods write their own plans, :func:`verify_plan` checks a
plan against the model that produced it and refuses a plan that lies:

1. every channel the plan calls pruned is exactly zero in the layer's effective weight and bias;
2. every input channel the counter treats as dead (all of its producers pruned) is exactly
   zero in the tensor the layer really receives on a batch of data -- this is what proves
   that BN biases, residual partners and the rest of the dependency group were masked too;
3. no output channel of the effective weight takes more than ``2**w_bits`` distinct values,
   and no layer input takes more than ``2**a_bits`` distinct values;
4. claimed weight sparsity is not above the sparsity of the effective weight;
5. claimed activation sparsity is not above the fraction of zeros in the tensor the layer
   really receives (after its input quantizer) on the batch -- a claim means zeros on every
   input (a static mask), so any batch must show at least that many.
"""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.accounting.counter import input_liveness
from jpqbench.accounting.plan import CompressionPlan, PlanMismatch, check_fits, conv_linear_layers
from jpqbench.nn.layers import observe_inputs, quantized_input
from jpqbench.nn.quant import FLOAT_BITS


@torch.no_grad()
def verify_plan(plan: CompressionPlan, model: nn.Module, batch: torch.Tensor) -> None:
    """Raise :class:`PlanMismatch` unless ``plan`` truthfully describes ``model`` (see module doc)."""
    plan.validate()
    check_fits(plan, model)
    layers = conv_linear_layers(model)
    alive_inputs = input_liveness(model, tuple(batch.shape[1:]), plan)
    seen_inputs: dict[str, torch.Tensor] = {}
    observe_inputs(model, layers, [batch],
                   lambda name, layer, x: seen_inputs.__setitem__(name, quantized_input(layer, x)))
    for name, layer in layers.items():
        claim = plan.layers[name]
        weight = layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight
        flat = weight.reshape(weight.shape[0], -1)
        bias = layer.effective_bias() if hasattr(layer, "effective_bias") else layer.bias
        if claim.pruned and (flat[claim.pruned].abs().sum() != 0
                             or (bias is not None and bias[claim.pruned].abs().sum() != 0)):
            raise PlanMismatch(f"layer {name}: channels the plan calls pruned are not zero",
                               "the method must mask the weights and bias of every pruned channel")
        dead = ~alive_inputs[name]
        x = seen_inputs[name]
        channel_axis = 1
        if dead.any() and x.movedim(channel_axis, 0)[dead].abs().sum() != 0:
            raise PlanMismatch(f"layer {name}: input channels that are pruned upstream are not zero at run time",
                               "mask the whole dependency group (BN after the conv, residual partners)")
        for channel, bits in enumerate(claim.channel_bits()):
            if 0 < bits < FLOAT_BITS and torch.unique(flat[channel]).numel() > 2 ** bits:
                raise PlanMismatch(f"layer {name}: channel {channel} has more than 2**{bits} distinct weight values",
                                   "the plan's w_bits must be what the weight quantizer does")
        if claim.a_bits < FLOAT_BITS and torch.unique(x).numel() > 2 ** claim.a_bits:
            raise PlanMismatch(f"layer {name}: input takes more than 2**{claim.a_bits} distinct values",
                               "the plan's a_bits must be what the input quantizer does")
        kept = flat[claim.kept_mask()]
        if kept.numel() and claim.w_sparsity > (kept == 0).float().mean().item() + 1e-6:
            raise PlanMismatch(f"layer {name}: claimed weight sparsity {claim.w_sparsity:.3f} is not in the weights",
                               "report the sparsity the weights really have")
        if claim.a_sparsity > (x == 0).float().mean().item() + 1e-6:
            raise PlanMismatch(f"layer {name}: claimed activation sparsity {claim.a_sparsity:.3f} is not in its input",
                               "report the sparsity the layer's inputs really have")
