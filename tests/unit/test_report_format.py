"""How the report writes what it shows: numbers as a paper prints them, one colour and marker per
method, the legend outside the data, and a LaTeX table that compiles (or, without pdflatex, parses)."""
from __future__ import annotations

import colorsys
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from test_report_stats import REFERENCE, RUNS, summary_of

from jpqbench.pipeline.report import (
    MARKERS,
    comparison_table,
    differences_to,
    latex_escape,
    mean_std,
    method_styles,
    pairwise_differences,
    pareto_figure,
    published_cells,
    signed,
    significant,
    styled,
    who_beats_whom_figure,
    write_latex,
)

EMBEDDED_METHODS = ["fp32", "ptq", "qat", "prune", "prune_then_quantize", "quantize_then_prune", "geta", "djpq",
                    "cwmpq", "ajpq", "noncomm[order=pq,acts=true]", "noncomm[order=qp,acts=true]"]


@pytest.mark.parametrize("value, text", [
    (0.019495396045, "0.0195"), (0.1, "0.100"), (1.0, "1.00"), (31.827625, "31.8"), (318.2, "318"),
    (44712.3, "44,700"), (0.09996, "0.100"), (-0.004567, "-0.00457"), (0, "0"), (float("nan"), ""), (pd.NA, ""),
])
def test_three_significant_figures(value: float, text: str) -> None:
    assert significant(value) == text


def test_accuracy_and_differences_as_a_paper_prints_them() -> None:
    assert mean_std(99.027778, 0.589256) == "99.03 ± 0.59"  # the six-decimal example
    assert mean_std(97.5, float("nan")) == "97.50" and mean_std(float("nan"), 1.0) == ""
    assert mean_std(99.027778, 0.589256, pm=r"$\pm$") == r"99.03 $\pm$ 0.59"
    assert (signed(0.4213), signed(-1.1), signed(-0.001)) == ("+0.42", "−1.10", "0.00")


def test_styled_tables_show_no_float_noise() -> None:
    table = comparison_table(summary_of(RUNS))
    html = styled(table[["train_time_s", "relative_bops", "failed"]]).to_html()
    assert ">1.00<" in html and ">0.0500<" in html and "0.050000" not in html
    assert ">digits / digits_cnn<" in html and ">0.05 BOPs<" in html  # (benchmark, budget, method) index


def hue(color: tuple[float, float, float]) -> float:
    return colorsys.rgb_to_hls(*color)[0]


@pytest.mark.parametrize("count", [12, 16, 24, 40])
def test_every_method_has_its_own_colour_and_marker(count: int) -> None:
    methods = [f"method{i:02d}" for i in range(count - 2)] + ["noncomm[order=pq]", "noncomm[order=qp]"]
    styles = method_styles(methods, references={"method00"})
    colors = [tuple(round(c, 3) for c in style.color) for style in styles.values()]
    assert len(set(colors)) == count
    markers = [style.marker for style in styles.values()]
    assert len(set(markers)) == min(count, len(MARKERS))
    assert len({(color, marker) for color, marker in zip(colors, markers)}) == count
    assert styles["method00"].color == (0.0, 0.0, 0.0)  # the budget-free reference: black
    pq, qp = styles["noncomm[order=pq]"].color, styles["noncomm[order=qp]"].color
    assert pq != qp and hue(pq) == pytest.approx(hue(qp), abs=0.02)  # one method's variants: one hue


def test_the_embedded_grid_has_no_shared_colour() -> None:
    """The issue's collisions (ajpq = qat blue, cwmpq = quantize_then_prune orange) are gone."""
    styles = method_styles(EMBEDDED_METHODS, references={"fp32"})
    assert styles["ajpq"].color != styles["qat"].color and styles["ajpq"].marker != styles["qat"].marker
    assert styles["cwmpq"].color != styles["quantize_then_prune"].color
    assert method_styles(reversed(EMBEDDED_METHODS), references={"fp32"}) == styles  # stable across figures


def test_pareto_legend_sits_outside_the_axes() -> None:
    table = comparison_table(summary_of(RUNS))
    fig = pareto_figure(table, "relative_bops", "BOPs")
    fig.canvas.draw()
    legend = fig.axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == sorted(method for method, *_ in RUNS[::3])
    axes_box = fig.axes[-1].get_window_extent()
    assert legend.get_window_extent().x0 >= axes_box.x1  # right of the data, not on it
    plt.close(fig)


def test_who_beats_whom_marks_the_distinguishable_pairs_and_says_on_how_many_seeds() -> None:
    fig = who_beats_whom_figure(pairwise_differences(summary_of(RUNS)))
    ax = fig.axes[0]
    order = [label.get_text() for label in ax.get_yticklabels()]
    assert order == [label.get_text() for label in ax.get_xticklabels()] and len(order) == 5
    marks = {(order[round(text.get_position()[1])], order[round(text.get_position()[0])]): text.get_text()
             for text in ax.texts}
    assert marks == {("geta", REFERENCE): "▲", (REFERENCE, "geta"): "▼", ("prune", REFERENCE): "▼",
                     (REFERENCE, "prune"): "▲", ("geta", "prune"): "▲", ("prune", "geta"): "▼",
                     ("ptq", "prune"): "▲", ("prune", "ptq"): "▼"}
    assert ax.get_title() == "digits / digits_cnn, BOPs ≤ 0.05\n2–3 seeds"
    plt.close(fig)
    two_seeds = who_beats_whom_figure(pairwise_differences(summary_of([run for run in RUNS if run[1] < 2])))
    assert two_seeds.axes[0].get_title().endswith("2 seeds: fewer than 3, nothing marked")
    assert not two_seeds.axes[0].texts
    plt.close(two_seeds)


def test_published_numbers_fit_in_a_few_columns() -> None:
    beside = pd.DataFrame([{"dataset": "cifar10", "model": "resnet20", "method": "djpq", "setting": "VIB",
                            "budget_metric": "bops", "relative_cost": 0.00476, "top1_pct": None,
                            "top1_delta_pp": -1.5, "source": "Wang et al.", "note": "", "ours_budget": 0.005,
                            "ours_top1_mean_pct": 91.234, "ours_top1_std_pct": 0.5, "ours_relative_bops": 0.0049}])
    row = published_cells(beside).iloc[0]
    assert row["relative cost"] == "0.00476 BOPs" and row["top-1 (%)"] == "−1.50 pp from FP32"
    assert row["ours: top-1 (%)"] == "91.23 ± 0.50 at budget 0.005 (0.00490 achieved)"


def latex_table(tmp_path: Path) -> str:
    """table.tex of two benchmarks: digits (RUNS) and minispeech (the reference and geta, one seed)."""
    summary = pd.concat([summary_of(RUNS), summary_of([(REFERENCE, 0, 0.9), ("geta", 0, 0.91)], dataset="minispeech",
                                                      model="ds_cnn")], ignore_index=True)
    path = tmp_path / "table.tex"
    write_latex(comparison_table(summary), differences_to(pairwise_differences(summary), REFERENCE), REFERENCE, path)
    return path.read_text(encoding="utf-8")


def test_latex_table_parses_as_booktabs(tmp_path: Path) -> None:
    """One float per benchmark; balanced environments, the three booktabs rules in order, every row
    as many cells as the column spec has columns, special characters escaped, nothing but ASCII
    (pdflatex's input)."""
    tex = latex_table(tmp_path)
    assert tex.isascii()
    for environment in ("table*", "tabular"):
        assert tex.count(rf"\begin{{{environment}}}") == tex.count(rf"\end{{{environment}}}") == 2
    floats = tex.split(r"\end{table*}")[:2]
    assert [re.search(r"\\label\{(.+?)\}", one).group(1) for one in floats] == [
        "tab:jpqbench-digits-digits_cnn", "tab:jpqbench-minispeech-ds_cnn"]
    digits = floats[0]
    assert digits.index(r"\toprule") < digits.index(r"\midrule") < digits.index(r"\bottomrule")
    assert r"\caption{digits / digits\_cnn: " in digits and "paired difference to prune\\_then\\_quantize" in digits
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", digits).group(1)
    body = digits[digits.index(r"\toprule") + len(r"\toprule"):digits.index(r"\bottomrule")]
    rows = [line for line in body.splitlines() if line.strip() and line.strip() != r"\midrule"]
    assert len(rows) == 1 + len(RUNS) // 3  # the header and one row per method
    for row in rows:
        assert row.rstrip().endswith(r"\\")
        assert len(re.split(r"(?<!\\)&", row)) == len(spec), row
    assert re.search(r"(?<!\\)_", re.sub(r"\\label\{.*?\}", "", tex)) is None  # labels may carry _
    assert r"prune\_then\_quantize & 92.00 $\pm$ 2.00 & reference" in digits
    assert r"\bfseries 96.00 $\pm$ 1.41" in digits and r"$\downarrow$" in digits
    assert r"+2.33 [+0.90, +3.77] $\uparrow$" in digits


@pytest.mark.parametrize("text, escaped", [("prune_then_quantize", r"prune\_then\_quantize"),
                                           ("a&b 50% $x #1 {y} ~ ^ \\", r"a\&b 50\% \$x \#1 \{y\} \textasciitilde{} "
                                                                       r"\textasciicircum{} \textbackslash{}")])
def test_latex_escape(text: str, escaped: str) -> None:
    assert latex_escape(text) == escaped


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_table_compiles(tmp_path: Path) -> None:
    """In a two-column paper, where the table* floats span the page, without an overfull line."""
    latex_table(tmp_path)
    (tmp_path / "paper.tex").write_text("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n"
                                        "\\begin{document}\n\\input{table.tex}\nText.\n\\end{document}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overfull" not in result.stdout
