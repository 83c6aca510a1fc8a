"""Sequential two-stage baselines: prune then quantize, and quantize then prune.

Both run :func:`run_sequential`; their common base, ``_Sequential``, says how they meet the budget.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from jpqbench import (
    Budget,
    ChannelGroups,
    Compressed,
    CompressionPlan,
    Method,
    RunContext,
    apply_masks,
    calibrate,
    plan_from_model,
    prune_to_budget,
    quantize_uniform,
    register_method,
    with_pruned,
    with_uniform_bits,
)


def run_sequential(model: nn.Module, budget: Budget, ctx: RunContext, order: Literal["pq", "qp"], bits: int,
                   prune_fraction: float, calibration_batches: int) -> dict[str, float]:
    """Compress ``model`` in place; returns the notes for the plan (ratio, bits).

    Both orders spend the run's epochs like any joint method: ``prune_fraction`` of them after the
    pruning stage, the rest after the quantization stage. The bit width ``bits`` (weights and
    activations) is fixed; the pruning ratio is the smallest that brings the counted cost *at those
    bits* within the budget, so the final model meets the budget whichever stage comes first.
    """
    first_epochs = round(ctx.epochs * prune_fraction) if order == "pq" else ctx.epochs - round(ctx.epochs * prune_fraction)

    def prune(phase_epochs: int) -> float:
        groups = ChannelGroups(model, ctx.input_shape)
        dense = CompressionPlan.dense(model)
        ratio, masks = prune_to_budget(groups, lambda m: ctx.cost(
            model, with_uniform_bits(with_pruned(dense, m[0]), bits, bits)).relative(budget.metric), budget.target)
        apply_masks(model, masks)
        ctx.train(model, phase_epochs, phase="prune")
        return ratio

    def quantize(phase_epochs: int) -> None:
        quantize_uniform(model, bits, bits, learn_step=True)
        calibrate(model, ctx.calibration_batches(calibration_batches))
        ctx.train(model, phase_epochs, phase="quantize")

    if order == "pq":
        ratio = prune(first_epochs)
        quantize(ctx.epochs - first_epochs)
    else:
        quantize(first_epochs)
        ratio = prune(ctx.epochs - first_epochs)
    return {"ratio": ratio, "bits": bits}


class _Sequential(Method):
    """How it meets the budget: weights and activations at ``bits`` (default 8) whatever the
    budget; the pruning ratio is the smallest (bisection) whose counted cost at those bits is
    within the target, so the result meets the budget whichever stage comes first. Pruning is
    structured magnitude pruning (torch-pruning groups: one uniform channel ratio per group,
    ranked by group L2 magnitude, residual partners together, the classifier's outputs kept);
    quantization is uniform LSQ, weights symmetric per output channel and layer inputs
    asymmetric per tensor, steps initialised by min/max calibration on training batches; the
    first and last layers are quantized like every other layer. The run's epochs are split
    between the two fine-tunings: ``prune_fraction`` of them (default half) follow the pruning
    stage, the rest follow the quantization stage.
    """

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
