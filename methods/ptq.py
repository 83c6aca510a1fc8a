"""Uniform post-training quantization."""
from __future__ import annotations

from jpqbench.methods_api import Budget, Compressed, Method, RunContext
from jpqbench.plan import CompressionPlan, plan_from_model, with_uniform_bits
from jpqbench.registry import register_method
from jpqbench.uniform import calibrate, largest_uniform_bits, quantize_uniform


@register_method("ptq")
class PTQ(Method):
    """Uniform post-training quantization: one bit width for all weights and activations, min/max calibrated.

    How it meets the budget: the largest b in {8..2} whose counted cost (w = a = b bits, no
    pruning) is within the target. Calibration uses ``calibration_batches`` batches of the
    *training* split. No training epochs are spent.
    """

    class Hparams(Method.Hparams):
        calibration_batches: int = 8

    def compress(self, model, budget: Budget, ctx: RunContext) -> Compressed:
        dense = CompressionPlan.dense(model)
        bits = largest_uniform_bits(
            lambda b: ctx.cost(model, with_uniform_bits(dense, b, b)).relative(budget.metric), budget.target)
        quantize_uniform(model, bits, bits)
        calibrate(model, ctx.calibration_batches(self.hp.calibration_batches))
        return Compressed(model, plan_from_model(model, self.name, {"bits": bits}))
