"""Turn ``results/summary.csv`` into the comparison table, the Pareto plots and an HTML report.

``analysis/report.ipynb`` is the report a reader sees; the code it runs lives here, so that it
is unit-tested and the notebook stays a handful of short cells. :func:`render` executes the
notebook with papermill (parameters ``summary_csv`` and ``out_dir``) and converts the executed
copy to one self-contained HTML file with nbconvert.

Every number in the comparison table and the figures comes from this harness's own runs.
Published numbers (``results/reference/published.csv``, each labelled "as reported" with its
source) are shown in a table of their own, beside our result for the same dataset, model and
method -- never mixed into our rows: their BOP counters, FP32 baselines and recipes differ.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pandas as pd
import papermill
import seaborn as sns
from matplotlib.figure import Figure
from nbconvert import HTMLExporter

from jpqbench.errors import UserError
from jpqbench.registry import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "analysis" / "report.ipynb"
PUBLISHED = PROJECT_ROOT / "results" / "reference" / "published.csv"
PUBLISHED_LABEL = "as reported"
# published.csv's columns and dtypes; relative_cost is a fraction of the FP32 cost in the
# paper's own counting, *_pct and *_pp are percent and percentage points.
PUBLISHED_COLUMNS = {
    "label": "string", "dataset": "string", "model": "string", "method": "string", "setting": "string",
    "budget_metric": "string", "relative_cost": "Float64", "weight_size_kb": "Float64", "top1_pct": "Float64",
    "top1_delta_pp": "Float64", "fp32_top1_pct": "Float64", "source": "string", "note": "string",
}
GROUP_KEYS = ["dataset", "model", "method", "budget_metric", "budget"]
# Pareto figures: file stem -> (table column on the log x axis, axis label).
FIGURES: dict[str, tuple[str, str]] = {
    "pareto_bops": ("relative_bops", "achieved BOPs / FP32 BOPs"),
    "pareto_size": ("weight_size_kb", "weight size (kB)"),
    "pareto_latency": ("relative_latency", "measured CPU latency / dense FP32 latency (batch 32, fastest pass)"),
}
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


def pareto_figure(table: pd.DataFrame, x: str, xlabel: str) -> Figure:
    """Top-1 (mean +- std over seeds) against a cost column of :func:`comparison_table`, log x.

    One panel per dataset and one line per method through its budgets; a budget-free method
    (the fp32 reference) is a point at its own cost plus a dashed horizontal line. A budget at
    which no seed finished with status "ok" (every run diverged) has no point.
    """
    plotted = table[table["seeds"] > 0].reset_index().astype({"top1_mean_pct": float, "top1_std_pct": float,
                                                              x: float})
    methods = sorted(plotted["method"].unique())
    colors = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    panels = list(plotted.groupby(["dataset", "model"]))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, ((dataset, model), rows) in zip(axes.flat, panels):
        for method, line in rows.groupby("method"):
            line = line.sort_values(x)
            reference = line["budget"].isna().all()
            ax.errorbar(line[x], line["top1_mean_pct"], yerr=line["top1_std_pct"], color=colors[method],
                        marker="o", capsize=3, linestyle="none" if reference else "-",
                        label=f"{method} (reference)" if reference else method)
            if reference:
                ax.axhline(line["top1_mean_pct"].iloc[0], color=colors[method], linestyle="--", linewidth=1)
        if rows[x].notna().any():
            ax.set_xscale("log")
        else:  # a figure no run has (e.g. the latency of runs from before the export existed)
            ax.text(0.5, 0.5, f"no run has {x}", transform=ax.transAxes, ha="center")
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"{dataset} ({model})")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> None:
    """PNG for viewing, SVG for editing and print."""
    for suffix in ("png", "svg"):
        fig.savefig(out_dir / f"{stem}.{suffix}", dpi=150, bbox_inches="tight")


def render(summary_csv: Path, out_dir: Path, published_csv: Path = PUBLISHED) -> Path:
    """Execute the analysis notebook on ``summary_csv`` into ``out_dir``; return its ``report.html``.

    ``out_dir`` receives the executed ``report.ipynb``, ``report.html`` (images embedded, so the
    file stands alone), ``table.csv``/``.md``, ``published.csv``/``.md`` (published numbers
    beside ours) and each of :data:`FIGURES` as PNG and SVG.
    The kernel runs in the project folder so that it imports this checkout's ``jpqbench``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "report.ipynb"
    papermill.execute_notebook(
        NOTEBOOK, executed, kernel_name="python3", cwd=PROJECT_ROOT, progress_bar=False,
        parameters={"summary_csv": str(Path(summary_csv).resolve()), "out_dir": str(out_dir.resolve()),
                    "published_csv": str(Path(published_csv).resolve())},
    )
    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nbformat.read(executed, as_version=4))
    html = out_dir / "report.html"
    html.write_text(body, encoding="utf-8")
    return html
