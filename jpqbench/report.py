"""Turn ``results/summary.csv`` into the comparison table, the Pareto plots and an HTML report.

``analysis/report.ipynb`` is the report a reader sees; the code it runs lives here, so that it
is unit-tested and the notebook stays a handful of short cells. :func:`render` executes the
notebook with papermill (parameters ``summary_csv`` and ``out_dir``) and converts the executed
copy to one self-contained HTML file with nbconvert.

Every number comes from this harness's own runs: published numbers are never mixed into
these tables or figures.
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

from jpqbench.registry import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "analysis" / "report.ipynb"
GROUP_KEYS = ["dataset", "model", "method", "budget_metric", "budget"]
# Pareto figures: file stem -> (table column on the log x axis, axis label).
FIGURES: dict[str, tuple[str, str]] = {
    "pareto_bops": ("relative_bops", "achieved BOPs / FP32 BOPs"),
    "pareto_size": ("weight_size_kb", "weight size (kB)"),
}


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, budget): its runs summarised over the seeds.

    Columns: top-1 accuracy in % as mean and sample std over seeds, the number of seeds,
    the number of failed runs, the mean achieved relative BOPs and weight size, the mean
    training time, and whether every seed met the budget (NA for budget-free references).
    A run whose status is not "ok" counts in ``failed`` only, never in a mean.
    """
    ok = summary["status"].eq("ok")
    runs = summary[GROUP_KEYS].assign(
        top1_pct=summary["top1"].where(ok) * 100,
        relative_bops=summary["relative_bops"].where(ok),
        weight_size_kb=summary["weight_size_kb"].where(ok),
        train_time_s=summary["train_time_s"].where(ok),
        target_met=summary["target_met"].where(ok),
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
    )


def write_table(table: pd.DataFrame, out_dir: Path) -> None:
    """``table.csv`` (for further analysis) and ``table.md`` (for a README or a paper draft)."""
    table.to_csv(out_dir / "table.csv")
    flat = table.reset_index()
    cells = flat.astype(object).where(flat.notna(), None)  # tabulate leaves None cells blank
    (out_dir / "table.md").write_text(cells.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")


def pareto_figure(table: pd.DataFrame, x: str, xlabel: str) -> Figure:
    """Top-1 (mean +- std over seeds) against a cost column of :func:`comparison_table`, log x.

    One panel per dataset and one line per method through its budgets; a budget-free method
    (the fp32 reference) is a point at its own cost plus a dashed horizontal line.
    """
    plotted = table.reset_index().astype({"top1_mean_pct": float, "top1_std_pct": float, x: float})
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
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"{dataset} ({model})")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> None:
    """PNG for viewing, SVG for editing and print."""
    for suffix in ("png", "svg"):
        fig.savefig(out_dir / f"{stem}.{suffix}", dpi=150, bbox_inches="tight")


def render(summary_csv: Path, out_dir: Path) -> Path:
    """Execute the analysis notebook on ``summary_csv`` into ``out_dir``; return its ``report.html``.

    ``out_dir`` receives the executed ``report.ipynb``, ``report.html`` (images embedded, so the
    file stands alone), ``table.csv``, ``table.md`` and each of :data:`FIGURES` as PNG and SVG.
    The kernel runs in the project folder so that it imports this checkout's ``jpqbench``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "report.ipynb"
    papermill.execute_notebook(
        NOTEBOOK, executed, kernel_name="python3", cwd=PROJECT_ROOT, progress_bar=False,
        parameters={"summary_csv": str(Path(summary_csv).resolve()), "out_dir": str(out_dir.resolve())},
    )
    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nbformat.read(executed, as_version=4))
    html = out_dir / "report.html"
    html.write_text(body, encoding="utf-8")
    return html
