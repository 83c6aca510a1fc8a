"""Latency on MPIC, a mixed-precision RISC-V core for extreme-edge inference (Ottavi et al. 2020)."""
from __future__ import annotations

from typing import Sequence

import torch

from jpqbench import CostModel, LayerCostInput, register_cost_model

# MACs per cycle of MPIC's kernels, by input-activation bits (rows) and weight bits (columns),
# as tabulated by Motetti et al. (IEEE TC 2024).
MACS_PER_CYCLE: dict[int, dict[int, float]] = {
    2: {2: 6.5, 4: 4.0, 8: 2.2},
    4: {2: 3.9, 4: 3.5, 8: 2.1},
    8: {2: 2.5, 4: 2.3, 8: 2.1},
}


@register_cost_model("mpic")
class MPIC(CostModel):
    """Cycles on MPIC: sum over kept output channels of MACs / MACs-per-cycle(a_bits, w_bits); 0-bit channels are free.

    Defined for weights in {0, 2, 4, 8} and activations in {2, 4, 8} bits only.
    """

    def check(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> None:
        bad_w = sorted(set(w_bits) - {0, 2, 4, 8})
        bad_a = sorted(set(a_bits) - set(MACS_PER_CYCLE))
        if bad_w or bad_a:
            raise ValueError(f"the mpic cost model is defined for weights in {{0, 2, 4, 8}} and activations in "
                             f"{{2, 4, 8}} bits; unsupported: weights {bad_w}, activations {bad_a}")

    def layer_cost(self, layer: LayerCostInput) -> torch.Tensor:
        def cycles_per_mac(w_bits: int, a_bits: int) -> float:
            return 0.0 if w_bits == 0 else 1.0 / MACS_PER_CYCLE[a_bits][w_bits]

        return (layer.macs * layer.expected(cycles_per_mac)).sum()
