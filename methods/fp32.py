"""The FP32 reference: the shared pretrained model, unchanged."""
from __future__ import annotations

from jpqbench.methods_api import Budget, Compressed, Method, RunContext
from jpqbench.plan import CompressionPlan
from jpqbench.registry import register_method


@register_method("fp32")
class FP32(Method):
    """FP32 reference: the shared pretrained checkpoint, evaluated as is (no budget, no training)."""

    takes_budget = False
    trains = False

    def compress(self, model, budget: Budget | None, ctx: RunContext) -> Compressed:
        return Compressed(model, CompressionPlan.dense(model))
