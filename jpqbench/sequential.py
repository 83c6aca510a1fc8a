"""The two-stage sequential pipelines: prune then quantize, or quantize then prune.

Both spend the run's epochs like any joint method: ``prune_fraction`` of them after the
first stage, the rest after the second. The bit width ``bits`` (weights and activations) is
fixed; the pruning ratio is the smallest that brings the counted cost *at those bits* within
the budget, so the final model meets the budget whichever stage comes first.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from jpqbench.methods_api import Budget, RunContext
from jpqbench.plan import CompressionPlan, with_pruned, with_uniform_bits
from jpqbench.prune import ChannelGroups, apply_masks, prune_to_budget
from jpqbench.uniform import calibrate, quantize_uniform


def run_sequential(model: nn.Module, budget: Budget, ctx: RunContext, order: Literal["pq", "qp"], bits: int,
                   prune_fraction: float, calibration_batches: int) -> dict[str, float]:
    """Compress ``model`` in place; returns the notes for the plan (ratio, bits)."""
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
