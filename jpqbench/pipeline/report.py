"""Turn ``results/summary.csv`` into the comparison table, the paired statistics, the Pareto plots,
a LaTeX table and an HTML report.

``jpqbench/pipeline/report.ipynb`` is the report a reader sees; the code it runs lives here, so that it
is unit-tested and the notebook stays a handful of short cells. :func:`render` executes the
notebook with papermill (parameters ``summary_csv``, ``out_dir``, ``published_csv`` and
``reference``) and converts the executed copy to one self-contained HTML file with nbconvert,
without the code cells: a reader sees text, tables and figures.

Every number in the comparison table and the figures comes from this harness's own runs.
Published numbers (``jpqbench/pipeline/published.csv``, each labelled "as reported" with its
source) are shown in a table of their own, beside our result for the same dataset, model and
method -- never mixed into our rows: their BOP counters, FP32 baselines and recipes differ.

Every method of a seed starts from the same FP32 checkpoint, so two methods are compared by
their difference per seed (:func:`pairwise_differences`), not by two means whose spread is
mostly the checkpoints'. A difference is marked only where its t-interval over seeds excludes
zero and it rests on at least :data:`MIN_SEEDS` seeds (``docs/report.md``).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pandas as pd
import papermill
import seaborn as sns
from matplotlib.figure import Figure
from nbconvert import HTMLExporter
from pandas.io.formats.style import Styler
from scipy import stats

from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import parse_method_spec

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "report.ipynb"  # package data: an installed jpqbench renders reports too
PUBLISHED = HERE / "published.csv"
# the folder holding the jpqbench package, where the notebook's kernel runs so that it imports this copy
PACKAGE_PARENT = HERE.parents[1]
PUBLISHED_LABEL = "as reported"
# published.csv's columns and dtypes; relative_cost is a fraction of the FP32 cost in the
# paper's own counting, *_pct and *_pp are percent and percentage points.
PUBLISHED_COLUMNS = {
    "label": "string", "dataset": "string", "model": "string", "method": "string", "setting": "string",
    "budget_metric": "string", "relative_cost": "Float64", "weight_size_kb": "Float64", "top1_pct": "Float64",
    "top1_delta_pp": "Float64", "fp32_top1_pct": "Float64", "source": "string", "note": "string",
}
GROUP_KEYS = ["dataset", "model", "method", "budget_metric", "budget"]
# One comparison: every method at one budget of one (dataset, model).
COMPARISON_KEYS = ["dataset", "model", "budget_metric", "budget"]
# The method every other one is compared with, seed by seed, unless `jpqbench report --reference`
# names another: the plain sequential pipeline, the baseline a joint method has to beat.
DEFAULT_REFERENCE = "prune_then_quantize"
CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer paired seeds than this and no difference is marked, whatever its interval
METRIC_LABELS = {"bops": "BOPs", "size": "size"}
LATEX_SPECIALS = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})
# Pareto figures: file stem -> (table column on the log x axis, axis label).
FIGURES: dict[str, tuple[str, str]] = {
    "pareto_bops": ("relative_bops", "achieved BOPs / FP32 BOPs"),
    "pareto_size": ("weight_size_kb", "weight size (kB)"),
    "pareto_latency": ("relative_latency", "measured CPU latency / dense FP32 latency (batch 32, fastest pass)"),
}
# One marker per method, in order; past the last they repeat, the colour still differs.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "p", "h", "<", ">", "d", "H", "8", "x", "+", "1")
# The columns of comparison_table beyond those of the comparison table a reader sees first.
DETAIL_COLUMNS = ["failed", "train_time_s", "searched_relative_bops", "artifact_kb", "relative_latency",
                  "export_flagged", "outside_paper_regime"]
# The real artifacts (jpqbench/export), per run: summary column -> column of artifact_table.
ARTIFACT_FIGURES: dict[str, str] = {
    "artifact_counted_bytes": "counted_kb", "artifact_bytes": "artifact_kb", "artifact_overhead_bytes": "overhead_kb",
    "export_top1_delta_pp": "export_delta_pp", "latency_dense_b1_ms": "dense_b1_ms",
    "latency_pruned_b1_ms": "pruned_b1_ms", "latency_dense_b32_ms": "dense_b32_ms",
    "latency_pruned_b32_ms": "pruned_b32_ms", "latency_dense_b32_min_ms": "dense_b32_min_ms",
    "latency_pruned_b32_min_ms": "pruned_b32_min_ms",
}


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, budget): its runs summarised over the seeds.

    Columns: top-1 accuracy in % as mean and sample std over seeds, the number of seeds,
    the number of failed runs, the mean achieved relative BOPs and weight size, the mean
    training time, whether every seed met the budget (NA for budget-free references), and of
    the exported artifacts the mean size on disk, the mean measured CPU latency at batch 32 of
    the physically pruned model relative to the dense one (fastest passes, measured back to back
    in the same process, so the ratio survives a loaded machine better than either figure) and the number
    of seeds whose exported accuracy is off by more than 0.1 pp (``export_flagged``).
    ``searched_relative_bops`` is the cost the method's own search reached before its
    projection onto the budget (empty for a method that does not project): far above the
    budget means the projection, not the search, set the result. ``outside_paper_regime``
    counts the seeds whose operating point the method's paper never ran (see
    :func:`outside_paper_regime`); such a row is not "the method's result" as its paper ran it.
    A run whose status is not "ok" counts in ``failed`` only, never in a mean.
    """
    ok = summary["status"].eq("ok")
    runs = summary[GROUP_KEYS].assign(
        top1_pct=summary["top1"].where(ok) * 100,
        relative_bops=summary["relative_bops"].where(ok),
        weight_size_kb=summary["weight_size_kb"].where(ok),
        train_time_s=summary["train_time_s"].where(ok),
        target_met=summary["target_met"].where(ok),
        artifact_kb=summary["artifact_bytes"].where(ok) / 1000,
        relative_latency=(summary["latency_pruned_b32_min_ms"] / summary["latency_dense_b32_min_ms"]).where(ok),
        export_flagged=summary["export_flagged"].where(ok).astype("Float64"),
        searched_relative_bops=summary["searched_relative_bops"].where(ok),
        outside_paper_regime=summary["outside_paper_regime"].notna() & ok,
        ok=ok,
        failed=~ok,
    )
    return runs.groupby(GROUP_KEYS, dropna=False).agg(
        top1_mean_pct=("top1_pct", "mean"),
        top1_std_pct=("top1_pct", "std"),
        seeds=("ok", "sum"),
        failed=("failed", "sum"),
        relative_bops=("relative_bops", "mean"),
        weight_size_kb=("weight_size_kb", "mean"),
        train_time_s=("train_time_s", "mean"),
        target_met=("target_met", "min"),  # min of booleans = all seeds met it; NA when none has a budget
        artifact_kb=("artifact_kb", "mean"),
        relative_latency=("relative_latency", "mean"),
        export_flagged=("export_flagged", "sum"),
        searched_relative_bops=("searched_relative_bops", "mean"),
        outside_paper_regime=("outside_paper_regime", "sum"),
    )


def outside_paper_regime(summary: pd.DataFrame) -> pd.DataFrame:
    """The (dataset, model, method, budget) rows whose runs are at an operating point the method's
    paper never ran, with the method's reason and the number of seeds: the report lists them
    so that a reader does not take such a row for the method's result as published."""
    flagged = summary[summary["status"].eq("ok") & summary["outside_paper_regime"].notna()]
    return (flagged.groupby([*GROUP_KEYS, "outside_paper_regime"], dropna=False).size().rename("seeds")
            .reset_index().rename(columns={"outside_paper_regime": "reason"}))


def artifact_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The exported artifacts per (dataset, model, method, budget), means over the "ok" seeds.

    Counted weight size (the counter's ``weight_bits``), the file's size and its exact overhead
    (header, scales, folded biases, activation tables) in kB; whether every file equals counted
    + overhead to the bit; the exported model's top-1 minus the fake-quantized one (pp) and the
    number of seeds flagged (> 0.1 pp); CPU latency (ms, median and, at batch 32, fastest pass) of
    the dense FP32 and the physically pruned model at batch 1 and 32, both BN-folded, measured
    back to back in the run's process.
    """
    ok = summary[summary["status"].eq("ok")]
    runs = ok[GROUP_KEYS].assign(**{name: ok[column].astype("Float64") for column, name in ARTIFACT_FIGURES.items()},
                                 size_ok=ok["artifact_size_ok"], flagged=ok["export_flagged"].astype("Float64"))
    for name in ("counted_kb", "artifact_kb", "overhead_kb"):
        runs[name] = runs[name] / 1000
    means = {name: (name, "mean") for name in ARTIFACT_FIGURES.values()}
    return runs.groupby(GROUP_KEYS, dropna=False).agg(**means, size_ok=("size_ok", "min"), flagged=("flagged", "sum"))


def read_published(path: Path = PUBLISHED) -> pd.DataFrame:
    """The published numbers, checked: the expected columns, and every row labelled "as reported"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"published numbers {path} do not exist", f"restore it from git ({PUBLISHED.name})")
    published = pd.read_csv(path, dtype=PUBLISHED_COLUMNS, keep_default_na=False, na_values=[""])
    if list(published.columns) != list(PUBLISHED_COLUMNS):
        raise UserError(f"{path} has columns {list(published.columns)}",
                        f"use exactly: {', '.join(PUBLISHED_COLUMNS)}")
    unlabelled = published.index[published["label"].ne(PUBLISHED_LABEL).fillna(True)]
    if len(unlabelled):
        raise UserError(f"{path}: rows {[int(i) + 2 for i in unlabelled]} are not labelled {PUBLISHED_LABEL!r}",
                        f"every published number carries label {PUBLISHED_LABEL!r} and its source")
    return published


def published_beside_ours(published: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Each published row beside our run of the same (dataset, model, method), if the grid has one.

    For a budgeted row ours is the budget closest to the published relative cost (same metric);
    ``ours_*`` columns are empty where the grid does not contain that benchmark or method.
    Two sources, two sets of columns: nothing is averaged or merged across them.
    """
    ours = table.reset_index()
    beside = []
    for _, row in published.iterrows():
        match = ours[ours["dataset"].eq(row["dataset"]) & ours["model"].eq(row["model"])
                     & ours["method"].eq(row["method"])]
        if pd.notna(row["budget_metric"]) and pd.notna(row["relative_cost"]):
            match = match[match["budget_metric"].eq(row["budget_metric"])]
            match = match.loc[(match["budget"].astype(float) - row["relative_cost"]).abs().sort_values().index[:1]]
        best = match.iloc[0] if len(match) else None
        beside.append({
            **row.to_dict(),
            "ours_budget": None if best is None else best["budget"],
            "ours_top1_mean_pct": None if best is None else best["top1_mean_pct"],
            "ours_top1_std_pct": None if best is None else best["top1_std_pct"],
            "ours_relative_bops": None if best is None else best["relative_bops"],
        })
    columns = [*PUBLISHED_COLUMNS, "ours_budget", "ours_top1_mean_pct", "ours_top1_std_pct", "ours_relative_bops"]
    return pd.DataFrame.from_records(beside, columns=columns)


def write_table(table: pd.DataFrame, out_dir: Path, stem: str = "table") -> None:
    """``<stem>.csv`` (for further analysis) and ``<stem>.md`` (for a README or a paper draft)."""
    indexed = table.index.nlevels > 1 or table.index.name is not None
    table.to_csv(out_dir / f"{stem}.csv", index=indexed)
    flat = table.reset_index() if indexed else table
    cells = flat.astype(object).where(flat.notna(), None)  # tabulate leaves None cells blank
    (out_dir / f"{stem}.md").write_text(cells.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")


def unfinished_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs whose status is not "ok" (e.g. "diverged"), with the reason: listed in the report,
    left out of every mean and plot."""
    columns = ["run_dir", "dataset", "model", "method", "budget", "seed", "status"]
    failed = summary[summary["status"].ne("ok")]
    reason = failed["error"] if "error" in failed.columns else pd.Series(pd.NA, index=failed.index)
    return failed[[c for c in columns if c in failed.columns]].assign(error=reason).reset_index(drop=True)


# ---------------------------------------------------------------- paired statistics
def pairwise_differences(summary: pd.DataFrame, confidence: float = CONFIDENCE,
                         min_seeds: int = MIN_SEEDS) -> pd.DataFrame:
    """Every ordered pair of methods at each budget: ``method``'s top-1 minus ``versus``'s, seed by seed (pp).

    Both runs of a seed start from the same FP32 checkpoint, so their difference cancels what the
    checkpoint contributes, and the spread left over the seeds is the methods' own. Only seeds at
    which both runs finished "ok" count (``seeds``). ``ci_low_pp``/``ci_high_pp`` bound the mean
    difference with a t-interval over those seeds (none from one seed). ``verdict`` is "better" or
    "worse" where the interval excludes zero and at least ``min_seeds`` seeds back it, "not
    distinguishable" where it includes zero, and "fewer than N seeds" otherwise, whatever the
    interval. Budget-free references (fp32) have no budget to share and are not compared.
    Index: (dataset, model, budget_metric, budget, method, versus).
    """
    ok = summary[summary["status"].eq("ok") & summary["budget"].notna()]
    runs = ok[[*COMPARISON_KEYS, "seed", "method"]].assign(top1_pct=ok["top1"].astype(float) * 100)
    pairs = runs.merge(runs, on=[*COMPARISON_KEYS, "seed"], suffixes=("", "_versus"))
    pairs = pairs[pairs["method"].ne(pairs["method_versus"])].rename(columns={"method_versus": "versus"})
    diffs = pairs.assign(diff_pp=pairs["top1_pct"] - pairs["top1_pct_versus"])
    table = diffs.groupby([*COMPARISON_KEYS, "method", "versus"])["diff_pp"].agg(
        seeds="count", diff_mean_pp="mean", diff_std_pp="std")
    half = stats.t.ppf((1 + confidence) / 2, table["seeds"] - 1) * table["diff_std_pp"] / np.sqrt(table["seeds"])
    table["ci_low_pp"] = table["diff_mean_pp"] - half
    table["ci_high_pp"] = table["diff_mean_pp"] + half
    table["verdict"] = np.select(
        [table["seeds"].lt(min_seeds), table["ci_low_pp"].gt(0), table["ci_high_pp"].lt(0)],
        [f"fewer than {min_seeds} seeds", "better", "worse"], "not distinguishable")
    return table


def differences_to(pairs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The rows of :func:`pairwise_differences` against ``reference``, indexed like :func:`comparison_table`
    (``versus`` kept as a column), so that they join its rows."""
    chosen = pairs[pairs.index.get_level_values("versus") == reference]
    return chosen.reset_index("versus").reorder_levels(GROUP_KEYS)


def overview(summary: pd.DataFrame, paired: pd.DataFrame, reference: str) -> str:
    """The report's first lines (Markdown): what ran, and how many seeds each paired claim rests on."""
    failed = int(summary["status"].ne("ok").sum())
    runs = f"**{len(summary)} runs** of {summary['method'].nunique()} methods" + (
        f", {failed} without a result (listed below)" if failed else ", all finished")
    grids = []
    for (dataset, model), rows in summary.groupby(["dataset", "model"]):
        budgets, seeds = rows["budget"].dropna().nunique(), rows["seed"].nunique()
        grids.append(f"{dataset} / {model} ({plural(budgets, 'budget')} × {plural(seeds, 'seed')})")
    return f"{runs}: {', '.join(grids)}.\n\n{seed_statement(paired, reference)}"


def plural(count: int, noun: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{count} {noun}{'s' * (count != 1)}"


def seed_count(seeds: pd.Series) -> str:
    """``2 seeds`` or ``2–3 seeds``: the range of paired seeds a set of differences rests on."""
    low, high = int(seeds.min()), int(seeds.max())
    return f"{low if low == high else f'{low}–{high}'} seed{'s' * (high != 1)}"


def seed_statement(paired: pd.DataFrame, reference: str, min_seeds: int = MIN_SEEDS) -> str:
    """How many seeds the paired differences to ``reference`` rest on, and how many of them are marked:
    with 2 seeds most gaps are inside the noise, and the reader has to be told so."""
    if paired.empty:
        return (f"No paired differences: the reference method `{reference}` has no finished run to pair with "
                "at any budget (choose another with `jpqbench report --reference METHOD`).")
    counts = [f"{dataset} / {model} on {seed_count(rows['seeds'])}"
              for (dataset, model), rows in paired.groupby(level=["dataset", "model"])]
    eligible = int(paired["seeds"].ge(min_seeds).sum())
    marked = int(paired["verdict"].isin(["better", "worse"]).sum())
    verdict = (f"{marked} of the {eligible} differences with enough seeds are marked."
               if eligible else f"With fewer than {min_seeds} seeds everywhere, no difference is marked: "
               "the gaps in the table are not evidence that one method beats another.")
    return (f"Each method is compared with `{reference}` seed by seed (both start from the same FP32 checkpoint), "
            f"with a {CONFIDENCE * 100:.0f} % t-interval over the seeds: {', '.join(counts)}. A difference is marked "
            f"(▲ better, ▼ worse) only where its interval excludes zero and it rests on at least {min_seeds} "
            f"seeds. {verdict}")


# ---------------------------------------------------------------- formatting
@dataclass(frozen=True)
class Notation:
    """How the comparison table writes its symbols: the same cells go to the HTML report (Unicode)
    and to the paper's LaTeX (math mode, no package beyond booktabs)."""

    pm: str
    minus: str
    better: str
    worse: str
    headers: tuple[str, str, str, str, str, str]  # top-1, difference, relative BOPs, size, target met, seeds


HTML = Notation("±", "−", "▲", "▼",
                ("top-1 (%)", "Δ top-1 (pp), 95 % CI", "rel. BOPs", "size (kB)", "met", "seeds"))
LATEX = Notation(r"$\pm$", "$-$", r"$\uparrow$", r"$\downarrow$",
                 (r"Top-1 (\%)", r"$\Delta$ top-1 (pp), 95\,\% CI", "Rel.\\ BOPs", "Size (kB)", "Met", "Seeds"))


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, trailing zeros kept (0.100, 0.0195, 31.8, 44,700):
    a cost reads as precise as it is, never as 0.019495396 or 4.47e+04. Empty for a missing value."""
    if pd.isna(value):
        return ""
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits - 1}e}")
    decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:,.{max(decimals, 0)}f}"


def signed(value: float, minus: str = HTML.minus) -> str:
    """A difference in pp with its sign and two decimals: ``+0.42``, ``−1.10``, ``0.00``."""
    return "0.00" if round(value, 2) == 0 else f"{value:+.2f}".replace("-", minus)


def mean_std(mean: float, std: float, pm: str = HTML.pm) -> str:
    """``99.03 ± 0.59`` (two decimals, as a paper prints accuracy in %); the mean alone from one seed."""
    if pd.isna(mean):
        return ""
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} {pm} {std:.2f}"


def difference_cell(row: pd.Series, reference: str, notation: Notation = HTML) -> str:
    """A row's paired difference to the reference: mean, interval and the mark its verdict earned."""
    if row["method"] == reference:
        return "reference"
    if pd.isna(row["diff_mean_pp"]):
        return ""
    cell = signed(row["diff_mean_pp"], notation.minus)
    if pd.notna(row["ci_low_pp"]):
        cell += f" [{signed(row['ci_low_pp'], notation.minus)}, {signed(row['ci_high_pp'], notation.minus)}]"
    mark = {"better": notation.better, "worse": notation.worse}.get(row["verdict"])
    return f"{cell} {mark}" if mark else cell


def budget_labels(frame: pd.DataFrame) -> pd.Series:
    """``0.02 BOPs`` per row of a frame with ``budget_metric`` and ``budget``; ``none`` for a reference."""
    metric = frame["budget_metric"].map(lambda name: METRIC_LABELS.get(name, name))
    return pd.Series([f"{budget:g} {name}" if pd.notna(budget) else "none"
                      for budget, name in zip(frame["budget"], metric)], index=frame.index)


def compact_index(frame: pd.DataFrame) -> pd.DataFrame:
    """Index (benchmark, budget, method) in place of the five :data:`GROUP_KEYS`, in reading order (the
    reference first, then budget by budget): the same rows, two fewer columns, so that a table fits the page."""
    flat = frame.reset_index() if list(frame.index.names) == GROUP_KEYS else frame
    flat = flat.sort_values([*COMPARISON_KEYS, "method"], na_position="first", ignore_index=True)
    index = pd.MultiIndex.from_arrays([flat["dataset"] + " / " + flat["model"], budget_labels(flat), flat["method"]],
                                      names=["benchmark", "budget", "method"])
    return flat.drop(columns=GROUP_KEYS).set_axis(index)


def styled(frame: pd.DataFrame) -> Styler:
    """A table as the report shows it: (benchmark, budget, method) as index where the frame has the
    group keys, floats to three significant figures, missing cells blank, no row numbers, and column
    names with spaces for underscores, so that a long name wraps instead of widening the page."""
    shown = compact_index(frame) if set(GROUP_KEYS) <= {*frame.columns, *frame.index.names} else frame
    floats = [name for name, dtype in shown.dtypes.items() if pd.api.types.is_float_dtype(dtype)]
    table = (shown.style.format(na_rep="").format(significant, subset=floats, na_rep="")
             .format_index(lambda name: str(name).replace("_", " "), axis="columns"))
    return table.hide(axis="index") if isinstance(shown.index, pd.RangeIndex) else table


# ---------------------------------------------------------------- the comparison table a reader sees
def comparison_rows(table: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """:func:`comparison_table`'s rows, each with its paired difference to the reference and ``best``:
    the highest mean top-1 of its budget (ties all best)."""
    rows = table.join(paired.drop(columns=["seeds"])).reset_index()
    top = rows.groupby(COMPARISON_KEYS, dropna=False)["top1_mean_pct"].transform("max")
    return rows.assign(best=rows["top1_mean_pct"].eq(top).fillna(False) & rows["budget"].notna())


def comparison_cells(rows: pd.DataFrame, reference: str, notation: Notation = HTML) -> pd.DataFrame:
    """:func:`comparison_rows` as a paper prints them: one string per cell, index (benchmark, budget, method)."""
    cells = pd.DataFrame({
        "top1": [mean_std(m, s, notation.pm) for m, s in zip(rows["top1_mean_pct"], rows["top1_std_pct"])],
        "diff": [difference_cell(row, reference, notation) for _, row in rows.iterrows()],
        "bops": rows["relative_bops"].map(significant),
        "size": rows["weight_size_kb"].map(significant),
        "met": rows["target_met"].map({True: "yes", False: "no"}).fillna(""),
        "seeds": [f"{seeds}" + (f" (+{failed} failed)" if failed else "") for seeds, failed
                  in zip(rows["seeds"], rows["failed"])],
    })
    return compact_index(pd.concat([rows[GROUP_KEYS], cells.set_axis(list(notation.headers), axis=1)], axis=1))


def styled_comparison(table: pd.DataFrame, paired: pd.DataFrame, reference: str,
                      notation: Notation = HTML) -> Styler:
    """The comparison table with the best top-1 of each budget in bold (``\\bfseries`` in LaTeX)."""
    rows = comparison_rows(table, paired)
    best = compact_index(rows[[*GROUP_KEYS, "best"]])["best"]
    return comparison_cells(rows, reference, notation).style.apply(
        lambda column: np.where(best.reindex(column.index), "font-weight: bold", ""), subset=[notation.headers[0]])


def latex_escape(text: str) -> str:
    """``text`` printed literally by LaTeX: method, dataset and model names carry ``_`` (and variants ``[k=v]``)."""
    return str(text).translate(LATEX_SPECIALS)


def latex_table(table: pd.DataFrame, paired: pd.DataFrame, reference: str, dataset: str, model: str) -> str:
    """One benchmark's comparison table as a booktabs ``table*`` float in ``\\footnotesize``: one
    benchmark per table, as a paper prints them, and narrow enough for a two-column page's full width."""
    caption = (rf"{latex_escape(dataset)} / {latex_escape(model)}: top-1 accuracy (mean $\pm$ std over seeds), its "
               rf"paired difference to {latex_escape(reference)} with a {CONFIDENCE * 100:.0f}\,\% t-interval over "
               r"the seeds, achieved BOPs relative to FP32 and weight size. Bold: the best mean top-1 at the budget; "
               rf"$\uparrow$/$\downarrow$: the interval excludes zero and rests on at least {MIN_SEEDS} seeds.")
    one = table.xs((dataset, model), level=["dataset", "model"], drop_level=False)
    return (styled_comparison(one, paired, reference, LATEX).format_index(latex_escape, axis=0)
            .hide(axis="index", level="benchmark").hide(axis="index", names=True)
            .set_table_styles([{"selector": "footnotesize", "props": ":;"},
                               {"selector": "setlength", "props": r":{\tabcolsep}{3pt};"}])
            .to_latex(hrules=True, environment="table*", position_float="centering", caption=caption,
                      label=f"tab:jpqbench-{dataset}-{model}", multirow_align="naive", convert_css=True,
                      column_format="ll" + "r" * len(LATEX.headers)))


def write_latex(table: pd.DataFrame, paired: pd.DataFrame, reference: str, path: Path) -> None:
    """``table.tex``: the comparison table, one booktabs float per (dataset, model), for ``\\input`` in a
    paper (needs ``\\usepackage{booktabs}`` only)."""
    benchmarks = table.index.droplevel(["method", "budget_metric", "budget"]).unique()
    path.write_text("\n".join(latex_table(table, paired, reference, dataset, model) for dataset, model in benchmarks),
                    encoding="utf-8")


def published_cells(beside: pd.DataFrame) -> pd.DataFrame:
    """:func:`published_beside_ours` as the report shows it: the paper's cost, its top-1 and our nearest
    result one cell each, so that the table fits the page (published.csv keeps every column)."""
    def cost(row: pd.Series) -> str:
        return "" if pd.isna(row["relative_cost"]) else (
            f"{significant(row['relative_cost'])} {METRIC_LABELS.get(row['budget_metric'], row['budget_metric'])}")

    def theirs(row: pd.Series) -> str:
        if pd.notna(row["top1_pct"]):
            return f"{row['top1_pct']:.2f}"
        return "" if pd.isna(row["top1_delta_pp"]) else f"{signed(row['top1_delta_pp'])} pp from FP32"

    def ours(row: pd.Series) -> str:
        return "" if pd.isna(row["ours_top1_mean_pct"]) else (
            f"{mean_std(row['ours_top1_mean_pct'], row['ours_top1_std_pct'])} at budget {row['ours_budget']:g} "
            f"({significant(row['ours_relative_bops'])} achieved)")

    return pd.DataFrame({
        "benchmark": beside["dataset"] + " / " + beside["model"], "method": beside["method"],
        "setting": beside["setting"], "relative cost": beside.apply(cost, axis=1),
        "top-1 (%)": beside.apply(theirs, axis=1), "source": beside["source"], "note": beside["note"],
        "ours: top-1 (%)": beside.apply(ours, axis=1),
    }).fillna("")


# ---------------------------------------------------------------- figures
@dataclass(frozen=True)
class MethodStyle:
    color: tuple[float, float, float]
    marker: str


def family_hues(count: int) -> list[tuple[float, float, float]]:
    """``count`` clearly different hues: tab10's, then up to 20 their lighter tab20 partners, past 20 HUSL
    (evenly spaced hues; with that many methods the marker carries more of the distinction)."""
    if count > 20:
        return sns.color_palette("husl", count)
    tab20 = sns.color_palette("tab20")
    return (tab20[0::2] + tab20[1::2])[:count]


def method_styles(methods: Iterable[str], references: Collection[str] = ()) -> dict[str, MethodStyle]:
    """A colour and a marker per method, both distinct, so that a method is found by either (and in
    greyscale print). Variants of one method (``noncomm[order=pq]``, ``noncomm[order=qp]``) are shades
    of one hue, the method's; the budget-free ``references`` (fp32) are black and greys, so that the
    compressed methods keep the ten clearest hues (:func:`family_hues`)."""
    names = sorted(set(methods))
    colors = dict(zip(sorted(references), sns.blend_palette(["black", "#999999"], max(len(references), 2))))
    families = sorted({parse_method_spec(name)[0] for name in names if name not in references})
    for family, hue in zip(families, family_hues(len(families))):
        members = [name for name in names if parse_method_spec(name)[0] == family and name not in references]
        colors.update(zip(members, sns.light_palette(hue, len(members) + 1, reverse=True)))
    return {name: MethodStyle(tuple(colors[name]), MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


def pareto_figure(table: pd.DataFrame, x: str, xlabel: str) -> Figure:
    """Top-1 (mean +- std over seeds) against a cost column of :func:`comparison_table`, log x.

    One panel per dataset and one line per method through its budgets, each method in its own
    colour and marker (:func:`method_styles`, the same in every figure), the legend outside the
    panels; a budget-free method (the fp32 reference) is a point at its own cost plus a dashed
    horizontal line. A budget at which no seed finished with status "ok" (every run diverged) has
    no point.
    """
    methods = table.index.get_level_values("method")
    styles = method_styles(methods, set(methods[table.index.get_level_values("budget").isna()]))
    plotted = table[table["seeds"] > 0].reset_index().astype({"top1_mean_pct": float, "top1_std_pct": float,
                                                              x: float})
    panels = list(plotted.groupby(["dataset", "model"]))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, ((dataset, model), rows) in zip(axes.flat, panels):
        for method, line in rows.groupby("method"):
            line = line.sort_values(x)
            reference = line["budget"].isna().all()
            style = styles[method]
            ax.errorbar(line[x], line["top1_mean_pct"], yerr=line["top1_std_pct"], color=style.color,
                        marker=style.marker, capsize=3, linestyle="none" if reference else "-",
                        label=f"{method} (reference)" if reference else method)
            if reference:
                ax.axhline(line["top1_mean_pct"].iloc[0], color=style.color, linestyle="--", linewidth=1)
        if rows[x].notna().any():
            ax.set_xscale("log")
        else:  # a figure no run has (e.g. the latency of runs from before the export existed)
            ax.text(0.5, 0.5, f"no run has {x}", transform=ax.transAxes, ha="center")
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"{dataset} ({model})")
    fig.tight_layout()
    entries = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    labels = sorted(entries)
    axes.flat[-1].legend([entries[label] for label in labels], labels, loc="upper left", bbox_to_anchor=(1.02, 1),
                         fontsize="small", frameon=False)
    return fig


def who_beats_whom_figure(pairs: pd.DataFrame) -> Figure:
    """One matrix per budget: cell (row, column) is the row method's top-1 minus the column method's,
    mean over the paired seeds (pp), blue where the row is ahead; ▲/▼ where :func:`pairwise_differences`
    calls it better/worse. Methods are ordered by their mean difference to all others, so the
    leaders come first; each title says how many seeds the panel rests on."""
    panels = list(pairs.groupby(level=COMPARISON_KEYS))
    columns = min(max(len(panels), 1), 2)
    rows_of_panels = max(math.ceil(len(panels) / columns), 1)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(6.5 * columns, 5.5 * rows_of_panels), squeeze=False)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no two methods share a budget and a seed", ha="center")
    for ax, ((dataset, model, metric, budget), rows) in zip(axes.flat, panels):
        flat = rows.reset_index()
        order = flat.groupby("method")["diff_mean_pp"].mean().sort_values(ascending=False).index
        matrix = flat.pivot(index="method", columns="versus", values="diff_mean_pp").reindex(index=order, columns=order)
        # the colour scale ends at the 98th percentile: one collapsed method must not wash out the rest
        limit = np.nanpercentile(matrix.abs().to_numpy(dtype=float), 98) or 1.0
        image = ax.imshow(matrix.to_numpy(dtype=float), cmap="RdBu", vmin=-limit, vmax=limit)
        fig.colorbar(image, ax=ax, shrink=0.7, label="mean paired Δ top-1 (pp), row − column")
        ax.set_xticks(range(len(order)), order, rotation=90)
        ax.set_yticks(range(len(order)), order)
        for _, pair in flat[flat["verdict"].isin(["better", "worse"])].iterrows():
            ax.text(order.get_loc(pair["versus"]), order.get_loc(pair["method"]),
                    HTML.better if pair["verdict"] == "better" else HTML.worse, ha="center", va="center")
        marked = "" if flat["seeds"].max() >= MIN_SEEDS else f": fewer than {MIN_SEEDS}, nothing marked"
        ax.set(xlabel="", ylabel="", title=f"{dataset} / {model}, {METRIC_LABELS.get(metric, metric)} ≤ {budget:g}\n"
                                          f"{seed_count(flat['seeds'])}{marked}")
    for ax in axes.flat[max(len(panels), 1):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> None:
    """PNG for viewing, SVG for editing and print."""
    for suffix in ("png", "svg"):
        fig.savefig(out_dir / f"{stem}.{suffix}", dpi=150, bbox_inches="tight")


def check_reference(summary_csv: Path, reference: str) -> None:
    """Refuse a reference method that has no budgeted run in the summary: every difference would be empty."""
    runs = pd.read_csv(summary_csv, usecols=["method", "budget"])
    methods = sorted(runs.loc[runs["budget"].notna(), "method"].unique())
    if reference not in methods:
        raise UserError(f"reference method {reference!r} has no budgeted run in {summary_csv}",
                        f"pass --reference with one of: {', '.join(methods)}")


def render(summary_csv: Path, out_dir: Path, published_csv: Path = PUBLISHED, reference: str | None = None) -> Path:
    """Execute the analysis notebook on ``summary_csv`` into ``out_dir``; return its ``report.html``.

    ``out_dir`` receives the executed ``report.ipynb``, ``report.html`` (images embedded, so the
    file stands alone; code cells left out), ``table.csv``/``.md`` and ``table.tex`` (the
    comparison table), ``paired.csv``/``.md`` (each method's paired difference to ``reference``),
    ``pairwise.csv`` (every pair), ``published.csv``/``.md`` (published numbers beside ours) and each
    of :data:`FIGURES` and ``who_beats_whom`` as PNG and SVG. ``reference`` defaults to
    :data:`DEFAULT_REFERENCE`; a named one must have run. The kernel runs in the folder holding
    this ``jpqbench`` package, so that it imports this copy of it.
    """
    if reference is not None:
        check_reference(Path(summary_csv), reference)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "report.ipynb"
    papermill.execute_notebook(
        NOTEBOOK, executed, kernel_name="python3", cwd=PACKAGE_PARENT, progress_bar=False,
        parameters={"summary_csv": str(Path(summary_csv).resolve()), "out_dir": str(out_dir.resolve()),
                    "published_csv": str(Path(published_csv).resolve()),
                    "reference": reference or DEFAULT_REFERENCE},
    )
    exporter = HTMLExporter(embed_images=True, exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4),
                                          resources={"metadata": {"name": "jpqbench report"}})
    html = out_dir / "report.html"
    html.write_text(body, encoding="utf-8")
    return html
