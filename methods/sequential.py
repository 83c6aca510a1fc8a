"""Sequential two-stage baselines: prune then quantize, and quantize then prune.

How they meet the budget: weights and activations at ``bits`` (default 8); the pruning
ratio is the smallest whose counted cost at those bits is within the target (see
jpqbench/sequential.py). Pruning is structured magnitude pruning (torch-pruning groups),
quantization is uniform LSQ; ``prune_fraction`` of the run's epochs follow the pruning stage.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from jpqbench.methods_api import Budget, Compressed, Method, RunContext
from jpqbench.plan import plan_from_model
from jpqbench.registry import register_method
from jpqbench.sequential import run_sequential


class _Sequential(Method):
    order: ClassVar[Literal["pq", "qp"]]

    test_hparams = {"calibration_batches": 1}

    class Hparams(Method.Hparams):
        bits: int = Field(8, ge=2, le=16, description="uniform weight and activation bits of the quantization stage")
        prune_fraction: float = Field(0.5, gt=0, lt=1, description="share of the run's epochs that follow the "
                                                                   "pruning stage (the rest follow quantization)")
        calibration_batches: int = Field(8, ge=1, description="training batches that initialise the LSQ steps")

    def compress(self, model, budget: Budget, ctx: RunContext) -> Compressed:
        notes = run_sequential(model, budget, ctx, self.order, self.hp.bits, self.hp.prune_fraction,
                               self.hp.calibration_batches)
        return Compressed(model, plan_from_model(model, self.name, notes))


@register_method("prune_then_quantize")
class PruneThenQuantize(_Sequential):
    """Sequential baseline: structured magnitude pruning + fine-tuning, then uniform LSQ quantization + fine-tuning."""

    order = "pq"


@register_method("quantize_then_prune")
class QuantizeThenPrune(_Sequential):
    """Sequential baseline: uniform LSQ quantization + fine-tuning, then structured magnitude pruning + fine-tuning."""

    order = "qp"
