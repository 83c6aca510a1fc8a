"""A run's cost target: :class:`Budget`, and the range check shared with the config's budgets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jpqbench.base.errors import UserError

BudgetMetric = Literal["bops", "size"]


def check_budget(target: float) -> float:
    """A budget is a fraction of the FP32 cost, strictly between 0 and 1."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"budget {target} is out of range: a budget is a fraction of the FP32 cost, "
                         f"strictly between 0 and 1 (e.g. 0.05 for 5 %)")
    return target


@dataclass(frozen=True)
class Budget:
    """A cost target as a fraction of the FP32 model's cost (``metric`` = "bops" or "size")."""

    metric: BudgetMetric
    target: float

    def __post_init__(self) -> None:
        if self.metric not in ("bops", "size"):
            raise UserError(f"unknown budget metric {self.metric!r}", "use --budget-metric bops or size")
        try:
            check_budget(self.target)
        except ValueError as error:
            raise UserError(str(error), "pass --budget as a fraction, e.g. --budget 0.05") from None

    @property
    def key(self) -> str:
        """The run-directory name of this budget, e.g. ``bops-0.05``."""
        return f"{self.metric}-{self.target:g}"
