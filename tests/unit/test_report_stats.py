"""The report's paired statistics, checked against arithmetic done by hand on a small table.

Every method of a seed starts from the same FP32 checkpoint, so the report compares two methods
by their top-1 difference per seed: mean, sample std, and a 95 % t-interval with n - 1 degrees of
freedom; a difference is marked only where the interval excludes zero on at least 3 seeds.
"""
from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

from jpqbench.pipeline.aggregate import COLUMNS, OPTIONAL_COLUMNS
from jpqbench.pipeline.report import (
    comparison_table,
    differences_to,
    overview,
    pairwise_differences,
    seed_statement,
    styled_comparison,
)

T_975_2DF = 4.302652729911275  # the 0.975 quantile of Student's t with 2 degrees of freedom (tables: 4.303)
REFERENCE = "prune_then_quantize"
# (method, seed, top1) at one budget; None: a diverged run
RUNS = [
    (REFERENCE, 0, 0.90), (REFERENCE, 1, 0.92), (REFERENCE, 2, 0.94),
    ("geta", 0, 0.92), ("geta", 1, 0.95), ("geta", 2, 0.96),  # +2, +3, +2 pp: better
    ("ptq", 0, 0.91), ("ptq", 1, 0.90), ("ptq", 2, 0.95),  # +1, -2, +1 pp: not distinguishable
    ("prune", 0, 0.85), ("prune", 1, 0.86), ("prune", 2, 0.88),  # -5, -6, -6 pp: worse
    ("qat", 0, 0.95), ("qat", 1, 0.97), ("qat", 2, None),  # +5, +5 pp on 2 seeds: never marked
]


def summary_of(runs: list[tuple[str, int, float | None]], budget: float = 0.05, dataset: str = "digits",
               model: str = "digits_cnn") -> pd.DataFrame:
    """Summary rows as `jpqbench aggregate` types them, for runs of one benchmark at one BOPs budget."""
    records = [{"dataset": dataset, "model": model, "method": method, "budget_metric": "bops",
                "budget": budget, "seed": seed, "top1": top1, "relative_bops": budget, "weight_size_kb": 10.0,
                "train_time_s": 1.0, "target_met": True, "status": "diverged" if top1 is None else "ok"}
               for method, seed, top1 in runs]
    typed = {**COLUMNS, **OPTIONAL_COLUMNS}
    return pd.DataFrame.from_records(records).reindex(columns=list(typed)).astype(typed)


def by_hand(diffs: list[float]) -> tuple[float, float, float]:
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    half = T_975_2DF * std / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


@pytest.fixture
def paired() -> pd.DataFrame:
    return differences_to(pairwise_differences(summary_of(RUNS)), REFERENCE)


@pytest.mark.parametrize("method, diffs, verdict", [
    ("geta", [2, 3, 2], "better"),
    ("ptq", [1, -2, 1], "not distinguishable"),
    ("prune", [-5, -6, -6], "worse"),
])
def test_paired_difference_matches_the_hand_computation(paired: pd.DataFrame, method: str, diffs: list[float],
                                                        verdict: str) -> None:
    row = paired.loc[("digits", "digits_cnn", method, "bops", 0.05)]
    mean, low, high = by_hand(diffs)
    assert row["seeds"] == 3 and row["versus"] == REFERENCE
    assert row["diff_mean_pp"] == pytest.approx(mean)
    assert row["diff_std_pp"] == pytest.approx(statistics.stdev(diffs))
    assert (row["ci_low_pp"], row["ci_high_pp"]) == (pytest.approx(low), pytest.approx(high))
    assert row["verdict"] == verdict


def test_geta_interval_by_the_numbers(paired: pd.DataFrame) -> None:
    """+2, +3, +2 pp: mean 7/3, std sqrt(1/3), half-width 4.3027 * sqrt(1/3) / sqrt(3) = 1.4342."""
    row = paired.loc[("digits", "digits_cnn", "geta", "bops", 0.05)]
    assert (row["ci_low_pp"], row["ci_high_pp"]) == (pytest.approx(0.8991, abs=1e-4), pytest.approx(3.7675, abs=1e-4))


def test_fewer_than_three_seeds_are_never_marked(paired: pd.DataFrame) -> None:
    """qat is 5 pp ahead on both of its seeds (the third diverged): the interval is [5, 5] and
    excludes zero, but two seeds are too few to mark it; only the seeds where both ran count."""
    row = paired.loc[("digits", "digits_cnn", "qat", "bops", 0.05)]
    assert row["seeds"] == 2 and row["diff_mean_pp"] == pytest.approx(5.0)
    assert row["ci_low_pp"] == pytest.approx(5.0) and row["verdict"] == "fewer than 3 seeds"


def test_one_seed_has_a_difference_but_no_interval() -> None:
    pairs = pairwise_differences(summary_of([(REFERENCE, 0, 0.90), ("geta", 0, 0.93)]))
    row = pairs.loc[("digits", "digits_cnn", "bops", 0.05, "geta", REFERENCE)]
    assert row["diff_mean_pp"] == pytest.approx(3.0) and row["seeds"] == 1
    assert pd.isna(row["ci_low_pp"]) and row["verdict"] == "fewer than 3 seeds"


def test_every_ordered_pair_is_antisymmetric_and_budgets_are_never_mixed() -> None:
    summary = pd.concat([summary_of(RUNS), summary_of([(REFERENCE, 0, 0.5), ("geta", 0, 0.6)], budget=0.02)],
                        ignore_index=True)
    pairs = pairwise_differences(summary)
    five = pairs.xs(0.05, level="budget")
    assert len(five) == 5 * 4  # every ordered pair of the 5 methods, none with itself
    forth = five.xs(("geta", "prune"), level=["method", "versus"])["diff_mean_pp"].iloc[0]
    back = five.xs(("prune", "geta"), level=["method", "versus"])["diff_mean_pp"].iloc[0]
    assert forth == pytest.approx(-back) == pytest.approx(8.0)  # [7, 9, 8] pp
    assert pairs.xs(0.02, level="budget")["diff_mean_pp"].abs().tolist() == [pytest.approx(10.0)] * 2


def test_budget_free_references_are_not_compared() -> None:
    fp32 = summary_of([("fp32", 0, 0.99), ("fp32", 1, 0.98)]).assign(budget=pd.NA, budget_metric=pd.NA)
    summary = pd.concat([summary_of(RUNS), fp32.astype(summary_of(RUNS).dtypes.to_dict())], ignore_index=True)
    pairs = pairwise_differences(summary)
    assert "fp32" not in set(pairs.index.get_level_values("method")) | set(pairs.index.get_level_values("versus"))


def test_the_report_says_how_many_seeds_the_claim_rests_on(paired: pd.DataFrame) -> None:
    summary = summary_of(RUNS)
    text = overview(summary, paired, REFERENCE)
    assert "**15 runs** of 5 methods, 1 without a result" in text
    assert "digits / digits_cnn (1 budget × 3 seeds)" in text
    assert "digits / digits_cnn on 2–3 seeds" in text and "at least 3 seeds" in text
    assert "2 of the 3 differences with enough seeds are marked" in text  # geta better, prune worse, ptq not
    two_seeds = differences_to(pairwise_differences(summary[summary["seed"] < 2]), REFERENCE)
    assert "no difference is marked" in seed_statement(two_seeds, REFERENCE)
    assert "No paired differences" in seed_statement(two_seeds.iloc[:0], "djpq")


def test_marks_reach_the_comparison_table(paired: pd.DataFrame) -> None:
    """▲/▼ where the verdict is better/worse, the reference row labelled, the best top-1 in bold."""
    table = comparison_table(summary_of(RUNS))
    styler = styled_comparison(table, paired, REFERENCE)
    cells = styler.data.droplevel(["benchmark", "budget"])
    diff = cells["Δ top-1 (pp), 95 % CI"]
    assert diff["geta"] == "+2.33 [+0.90, +3.77] ▲" and diff["prune"].endswith("▼")
    assert diff["ptq"] == "0.00 [−4.30, +4.30]" and diff[REFERENCE] == "reference"
    assert diff["qat"] == "+5.00 [+5.00, +5.00]"  # two seeds: the interval, no mark
    assert cells.loc["qat", "seeds"] == "2 (+1 failed)"
    html = styler.to_html()
    assert html.count("font-weight: bold") == 1 and "96.00" in cells.loc["qat", "top-1 (%)"]  # qat: best mean
