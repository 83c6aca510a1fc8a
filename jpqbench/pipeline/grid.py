"""The grid: which runs a config asks for, and where each one lives.

Defined once and used by the Snakefile (to request the runs), by ``jpqbench run`` (its default
run folder) and by :func:`jpqbench.pipeline.aggregate.aggregate` (to read exactly those runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jpqbench.base.config import BenchConfig
from jpqbench.base.errors import UserError

if TYPE_CHECKING:
    from jpqbench.base.budget import Budget

REFERENCE_KEY = "reference"  # the run-folder name of a budget-free method (the fp32 reference)


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid: a method on a (dataset, model) at a budget (None: budget-free) with a seed."""

    dataset: str
    model: str
    method: str
    budget: Budget | None
    seed: int

    @property
    def budget_key(self) -> str:
        """The budget's folder name: ``bops-0.05``, or ``reference`` for a budget-free method."""
        return self.budget.key if self.budget else REFERENCE_KEY

    def run_dir(self, runs_root: Path) -> Path:
        """``<runs_root>/<dataset>/<model>/<method>/<budget_key>/s<seed>``: where the run writes its files."""
        return Path(runs_root) / self.dataset / self.model / self.method / self.budget_key / f"s{self.seed}"


def grid(config: BenchConfig) -> list[GridPoint]:
    """Every run of ``config``: budget-free methods once per seed, the others at every budget too."""
    # imported here, not at the top: it loads torch and the method plugins, which the report
    # notebook (it only needs read_summary) has no use for
    from jpqbench.base.budget import Budget
    from jpqbench.base.method_spec import method_takes_budget

    points = []
    for dataset, model in config.benchmarks():
        for method in config.methods:
            budgets = ([Budget(config.budget_metric, target) for target in config.budgets_of(dataset)]
                       if method_takes_budget(method) else [None])
            points += [GridPoint(dataset, model, method, budget, seed)
                       for budget in budgets for seed in config.seeds_of(dataset)]
    return points


def budget_from_key(key: str) -> Budget | None:
    """The inverse of :attr:`GridPoint.budget_key`: ``bops-0.05`` -> ``Budget("bops", 0.05)``."""
    from jpqbench.base.budget import Budget

    if key == REFERENCE_KEY:
        return None
    metric, _, target = key.partition("-")
    try:
        return Budget(metric, float(target))
    except ValueError:
        raise UserError(f"budget folder name {key!r} is not <metric>-<target>",
                        f"use e.g. bops-0.05, size-0.1 or {REFERENCE_KEY}") from None
