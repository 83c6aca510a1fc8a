"""The FP32 reference: the shared pretrained model, unchanged."""
from __future__ import annotations

from jpqbench import Budget, Compressed, CompressionPlan, Method, RunContext, register_method


@register_method("fp32")
class FP32(Method):
    """FP32 reference: the shared pretrained checkpoint, evaluated as is (no budget, no training).

    It takes no budget, so the grid runs it once per seed (not once per budget); every other
    method starts from the same checkpoint of its seed.
    """

    takes_budget = False
    trains = False

    def compress(self, model, budget: Budget | None, ctx: RunContext) -> Compressed:
        return Compressed(model, CompressionPlan.dense(model))
