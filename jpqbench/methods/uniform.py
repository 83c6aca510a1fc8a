"""Uniform quantization baselines: post-training (``ptq``) and quantization-aware training (``qat``).

Each class docstring says how it meets the budget (the same rule for both); the shared code is
:class:`_Uniform` and jpqbench/nn/uniform_quantization.py.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from jpqbench import (
    Budget,
    Compressed,
    CompressionPlan,
    Method,
    RunContext,
    plan_from_model,
    quantize_within_budget,
    register_method,
    with_uniform_bits,
)


class _Uniform(Method):
    learn_step: ClassVar[bool]

    test_hparams = {"calibration_batches": 1}

    class Hparams(Method.Hparams):
        calibration_batches: int = Field(8, ge=1, description="training batches of min/max calibration")

    def compress(self, model, budget: Budget, ctx: RunContext) -> Compressed:
        dense = CompressionPlan.dense(model)
        bits = quantize_within_budget(
            model, lambda b: ctx.cost(model, with_uniform_bits(dense, b, b)).relative(budget.metric), budget.target,
            ctx.calibration_batches(self.hp.calibration_batches), learn_step=self.learn_step)
        if self.learn_step:
            ctx.train(model, ctx.epochs, phase="qat")
        return Compressed(model, plan_from_model(model, self.name, {"bits": bits}))


@register_method("ptq")
class PTQ(_Uniform):
    """Uniform post-training quantization: one bit width for all weights and activations, min/max calibrated, no training.

    How it meets the budget: the largest b in {8..2} whose counted cost with weights and
    activations at b bits (no pruning) is within the target. Weights are quantized symmetric per
    output channel, layer inputs asymmetric per tensor, min/max calibrated on
    ``calibration_batches`` batches of the *training* split (jpqbench/nn/uniform_quantization.py);
    the first and last layers are quantized like every other layer.
    """

    learn_step = False
    trains = False


@register_method("qat")
class QAT(_Uniform):
    """Uniform QAT with LSQ: one bit width for all layers, calibrated, then steps and weights trained for the run's epochs.

    How it meets the budget: as ``ptq``, the largest b in {8..2} whose counted cost with weights
    and activations at b bits (no pruning) is within the target. Weights are quantized symmetric
    per output channel, layer inputs asymmetric per tensor, the steps initialised by min/max
    calibration on ``calibration_batches`` batches of the *training* split and then learned
    (LSQ) with the weights for all of the run's epochs; the first and last layers are quantized
    like every other layer.
    """

    learn_step = True
