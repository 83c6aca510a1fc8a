"""Model size in bits: the weight memory a precision assignment needs."""
from __future__ import annotations

import torch

from jpqbench import FLOAT_BITS, CostModel, LayerCostInput, register_cost_model


@register_cost_model("size")
class Size(CostModel):
    """Weight bits: sum over output channels of kept fan-in x bit width, plus a 32-bit bias per kept channel.

    Motetti et al.'s size regulariser is ``sum K^2 * C_in_eff * sum_c sum_p theta_pc * p``; the
    bias term is added so that a hard assignment costs exactly the counter's ``weight_bits``.
    """

    def layer_cost(self, layer: LayerCostInput) -> torch.Tensor:
        bias = FLOAT_BITS * layer.keep if layer.shape.has_bias else torch.zeros_like(layer.keep)
        return (layer.fan_in * layer.expected_w_bits() + bias).sum()
