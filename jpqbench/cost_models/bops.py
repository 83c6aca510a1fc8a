"""Bit operations: MACs weighted by weight and activation bit widths."""
from __future__ import annotations

import torch

from jpqbench import CostModel, LayerCostInput, register_cost_model


@register_cost_model("bops")
class Bops(CostModel):
    """BOPs: sum over kept output channels of MACs x b_w x b_a (the counter's ``bops`` at a hard assignment)."""

    def layer_cost(self, layer: LayerCostInput) -> torch.Tensor:
        return (layer.macs * layer.expected(lambda w_bits, a_bits: w_bits * a_bits)).sum()
