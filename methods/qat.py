"""Uniform quantization-aware training with learned step sizes (LSQ)."""
from __future__ import annotations

from jpqbench.methods_api import Budget, Compressed, Method, RunContext
from jpqbench.plan import CompressionPlan, plan_from_model, with_uniform_bits
from jpqbench.registry import register_method
from jpqbench.uniform import calibrate, largest_uniform_bits, quantize_uniform


@register_method("qat")
class QAT(Method):
    """Uniform QAT with LSQ: one bit width for all layers, steps learned during the run's epochs.

    How it meets the budget: the largest b in {8..2} whose counted cost (w = a = b, no pruning)
    is within the target; quantizers are min/max calibrated on training batches, then weights
    and steps are fine-tuned for all of the run's epochs.
    """

    class Hparams(Method.Hparams):
        calibration_batches: int = 8

    def compress(self, model, budget: Budget, ctx: RunContext) -> Compressed:
        dense = CompressionPlan.dense(model)
        bits = largest_uniform_bits(
            lambda b: ctx.cost(model, with_uniform_bits(dense, b, b)).relative(budget.metric), budget.target)
        quantize_uniform(model, bits, bits, learn_step=True)
        calibrate(model, ctx.calibration_batches(self.hp.calibration_batches))
        ctx.train(model, ctx.epochs, phase="qat")
        return Compressed(model, plan_from_model(model, self.name, {"bits": bits}))
