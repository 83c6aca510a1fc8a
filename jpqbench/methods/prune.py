"""Structured magnitude pruning (FP32 weights)."""
from __future__ import annotations

from jpqbench import (
    Budget,
    ChannelGroups,
    Compressed,
    CompressionPlan,
    Method,
    RunContext,
    apply_masks,
    plan_from_model,
    prune_to_budget,
    register_method,
    with_pruned,
)


@register_method("prune")
class Prune(Method):
    """Structured magnitude pruning: one uniform channel ratio per dependency group, then fine-tuning.

    How it meets the budget: the smallest ratio (bisection) at which the counted cost of the
    masked FP32 model is within the target; channels are ranked by group L2 magnitude
    (torch-pruning), residual partners pruned together, the classifier's outputs kept. The
    masks are fixed for all of the run's fine-tuning epochs. With no quantizer, it fine-tunes in
    the recipe's ``precision`` (bf16 autocast) when one is set (``autocast``). Weights stay FP32,
    so low BOPs budgets take heavy pruning (on the papers' grid 68-96 % of every group's channels, 0.1 to
    0.005 of FP32 BOPs); a budget that pruning 98 % of every group cannot reach is refused with
    a message.
    """

    autocast = True

    def compress(self, model, budget: Budget, ctx: RunContext) -> Compressed:
        groups = ChannelGroups(model, ctx.input_shape)
        dense = CompressionPlan.dense(model)
        ratio, masks = prune_to_budget(
            groups, lambda m: ctx.cost(model, with_pruned(dense, m[0])).relative(budget.metric), budget.target)
        apply_masks(model, masks)
        ctx.train(model, ctx.epochs, phase="finetune")
        return Compressed(model, plan_from_model(model, self.name, {"ratio": ratio}))
