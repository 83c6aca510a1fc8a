"""aggregate (metrics.json -> summary.csv), the comparison table, the rendered report, and the
Snakemake DAG of the embedded grid.

The run folders are written here by hand with known numbers, so every mean and std the table
shows can be checked against arithmetic done in the test.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from paths import REPO_ROOT

from jpqbench.base.config import BenchConfig
from jpqbench.base.errors import UserError
from jpqbench.pipeline.aggregate import COLUMNS, aggregate, read_summary
from jpqbench.pipeline.grid import GridPoint, budget_from_key
from jpqbench.pipeline.report import (
    FIGURES,
    PUBLISHED,
    PUBLISHED_COLUMNS,
    comparison_table,
    outside_paper_regime,
    published_beside_ours,
    read_published,
    render,
)

PROJECT = REPO_ROOT

# (method, budget, seed, top1, relative_bops, target_met, status): the grid of CONFIG below
# (fp32 + qat at two budgets, seeds 0 and 1), plus one failed qat run and one stale run of a
# budget and seed the config does not ask for.
RUNS = [
    ("fp32", None, 0, 0.97, 1.0, None, "ok"),
    ("fp32", None, 1, 0.95, 1.0, None, "ok"),
    ("qat", 0.05, 0, 0.90, 0.048, True, "ok"),
    ("qat", 0.05, 1, 0.94, 0.052, True, "ok"),
    ("qat", 0.02, 0, 0.80, 0.019, True, "ok"),
    ("qat", 0.02, 1, 0.10, None, None, "diverged"),
]
STALE = ("qat", 0.1, 7, 0.99, 0.09, True, "ok")
CONFIG = BenchConfig(seeds=[0, 1], budget_metric="bops", budgets=[0.02, 0.05], methods=["fp32", "qat"],
                     datasets={"digits": {"models": {"digits_cnn": {}}, "pretrain_epochs": 1, "epochs": 1,
                                          "batch_size": 8, "lr": 0.1, "finetune_lr": 0.01}})


def metrics_record(method: str, budget: float | None, seed: int, top1: float, relative_bops: float | None,
                   target_met: bool | None, status: str) -> dict:
    """A well-formed metrics.json as `jpqbench run` writes it, with the figures that matter here."""
    return {
        "dataset": "digits", "model": "digits_cnn", "method": method,
        "budget_metric": None if budget is None else "bops", "budget": budget, "seed": seed, "epochs": 15,
        "top1": top1, "top5": None, "val_top1": top1, "relative_bops": relative_bops,
        "relative_size": relative_bops, "bops": 1e6, "macs": 1e3, "weight_bits": 8e4,
        "weight_size_kb": 100 * (relative_bops or 1.0), "params": 2500, "nonzero_params": 2000,
        "target_met": target_met, "train_time_s": 10.0 + seed, "compute_time_s": 9.0, "wall_time_s": 12.0,
        "search_time_s": 0.0, "status": status, "mlflow_run_id": f"run{seed}", "git_commit": "abc123",
        "data_hash": "d1g1ts", "epochs_used": 15,
    }


def write_run(runs_root: Path, run: tuple) -> None:
    method, budget, seed = run[:3]
    key = "reference" if budget is None else f"bops-{budget:g}"
    folder = runs_root / "digits" / "digits_cnn" / method / key / f"s{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics_record(*run)))


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for run in [*RUNS, STALE]:
        write_run(root, run)
    return root


def test_aggregate_without_config_reads_every_run(runs_root: Path, tmp_path: Path) -> None:
    frame = aggregate(runs_root, tmp_path / "out" / "summary.csv")
    assert len(frame) == len(RUNS) + 1
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert list(frame.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert {"epochs_used", "run_dir"} <= set(frame.columns)  # extra figures are kept, not dropped
    assert frame["budget"].dtype == "Float64" and frame["seed"].dtype == "Int64"
    assert frame["target_met"].dtype == "boolean" and frame["status"].dtype == "string"
    assert frame["budget"].isna().sum() == 2 and frame["top5"].isna().all()


def test_aggregate_with_config_reads_exactly_the_grid(runs_root: Path, tmp_path: Path) -> None:
    frame = aggregate(runs_root, tmp_path / "summary.csv", CONFIG)
    assert len(frame) == len(RUNS)
    assert 7 not in set(frame["seed"]) and 0.1 not in set(frame["budget"].dropna())
    assert set(frame["run_dir"]) == {f"digits/digits_cnn/{run}" for run in (
        "fp32/reference/s0", "fp32/reference/s1", "qat/bops-0.05/s0", "qat/bops-0.05/s1",
        "qat/bops-0.02/s0", "qat/bops-0.02/s1")}


def test_aggregate_refuses_a_grid_with_missing_runs(runs_root: Path, tmp_path: Path) -> None:
    (runs_root / "digits" / "digits_cnn" / "qat" / "bops-0.05" / "s1" / "metrics.json").unlink()
    with pytest.raises(UserError, match="1 of the grid's 6 runs have no metrics.json"):
        aggregate(runs_root, tmp_path / "summary.csv", CONFIG)


def test_aggregate_refuses_metrics_without_the_contract_keys(runs_root: Path, tmp_path: Path) -> None:
    path = runs_root / "digits" / "digits_cnn" / "fp32" / "reference" / "s0" / "metrics.json"
    record = json.loads(path.read_text())
    del record["git_commit"]
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="lacks the keys git_commit"):
        aggregate(runs_root, tmp_path / "summary.csv")


def test_read_summary_restores_the_dtypes(runs_root: Path, tmp_path: Path) -> None:
    written = aggregate(runs_root, tmp_path / "summary.csv")
    read = read_summary(tmp_path / "summary.csv")
    pd.testing.assert_frame_equal(read[list(COLUMNS)], written[list(COLUMNS)])


def test_budget_folder_names_round_trip() -> None:
    point = GridPoint("digits", "digits_cnn", "qat", budget_from_key("bops-0.05"), 1)
    assert point.budget_key == "bops-0.05"
    assert point.run_dir(Path("runs")) == Path("runs/digits/digits_cnn/qat/bops-0.05/s1")
    assert budget_from_key("reference") is None
    with pytest.raises(UserError, match="not <metric>-<target>"):
        budget_from_key("bops-five")


def test_comparison_table_summarises_seeds(runs_root: Path, tmp_path: Path) -> None:
    table = comparison_table(aggregate(runs_root, tmp_path / "summary.csv", CONFIG))
    assert len(table) == 3
    qat = table.loc[("digits", "digits_cnn", "qat", "bops", 0.05)]
    assert qat["top1_mean_pct"] == pytest.approx(92.0)
    assert qat["top1_std_pct"] == pytest.approx(math.sqrt(2 * 2.0**2 / 1))  # sample std of 90 and 94
    assert qat["relative_bops"] == pytest.approx(0.05)
    assert qat["seeds"] == 2 and qat["failed"] == 0 and bool(qat["target_met"])
    assert qat["train_time_s"] == pytest.approx(10.5)
    # the diverged seed counts as failed and stays out of every mean
    low = table.loc[("digits", "digits_cnn", "qat", "bops", 0.02)]
    assert low["top1_mean_pct"] == pytest.approx(80.0) and pd.isna(low["top1_std_pct"])
    assert low["seeds"] == 1 and low["failed"] == 1
    reference = table.xs("fp32", level="method").iloc[0]
    assert reference["top1_mean_pct"] == pytest.approx(96.0)
    assert reference["top1_std_pct"] == pytest.approx(math.sqrt(2))
    assert pd.isna(reference["target_met"])


def test_comparison_table_flags_a_missed_target(runs_root: Path, tmp_path: Path) -> None:
    frame = aggregate(runs_root, tmp_path / "summary.csv", CONFIG)
    frame.loc[(frame["method"] == "qat") & (frame["budget"] == 0.05) & (frame["seed"] == 1), "target_met"] = False
    assert not comparison_table(frame).loc[("digits", "digits_cnn", "qat", "bops", 0.05), "target_met"]


def test_searched_cost_and_outside_regime_flags_reach_the_table_and_their_own_list(runs_root: Path,
                                                                                   tmp_path: Path) -> None:
    """A method's pre-projection cost is averaged over the ok seeds and the flagged seeds are counted
    and listed with the reason; runs recorded without these keys (older runs, fp32) leave them empty."""
    qat = runs_root / "digits" / "digits_cnn" / "qat"
    for seed, searched in ((0, 0.09), (1, 0.11)):
        path = qat / "bops-0.05" / f"s{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        reason = "uses 3 bits where the paper ran 8" if seed == 1 else None
        path.write_text(json.dumps({**record, "searched_relative_bops": searched, "outside_paper_regime": reason}))
    frame = aggregate(runs_root, tmp_path / "summary.csv", CONFIG)
    pd.testing.assert_frame_equal(read_summary(tmp_path / "summary.csv"), frame)
    assert frame["outside_paper_regime"].dtype == "string" and frame["searched_relative_bops"].dtype == "Float64"
    table = comparison_table(frame)
    row = table.loc[("digits", "digits_cnn", "qat", "bops", 0.05)]
    assert row["searched_relative_bops"] == pytest.approx(0.10) and row["outside_paper_regime"] == 1
    assert pd.isna(table.loc[("digits", "digits_cnn", "qat", "bops", 0.02), "searched_relative_bops"])
    assert table["outside_paper_regime"].sum() == 1
    flagged = outside_paper_regime(frame)
    assert flagged.to_dict("records") == [{"dataset": "digits", "model": "digits_cnn", "method": "qat",
                                           "budget_metric": "bops", "budget": 0.05,
                                           "reason": "uses 3 bits where the paper ran 8", "seeds": 1}]


@pytest.mark.slow
def test_render_writes_the_html_report_tables_and_figures(runs_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI, from a folder outside the repository: the notebook and the published numbers
    come with the package, as for a plain `pip install .`."""
    from jpqbench.pipeline.cli import main

    aggregate(runs_root, tmp_path / "summary.csv", CONFIG)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--summary", "summary.csv", "--out", "report"]) == 0
    html = tmp_path / "report" / "report.html"
    text = html.read_text()
    assert "92.00 ± 2.83" in text and ">0.0500<" in text  # the comparison table, as a paper prints it
    assert "0.050000" not in text and "top1_mean_pct" not in text
    assert "from jpqbench" not in text and "read_summary" not in text  # no code cells
    assert "<title>jpqbench report</title>" in text and "**6 runs**" not in text and "6 runs</strong>" in text
    assert "No paired differences" in text  # the default reference, prune_then_quantize, did not run
    assert text.count("data:image/png;base64,") >= len(FIGURES) + 1  # figures embedded, not linked
    assert "Published numbers, as reported" in text and "Qu et al., CVPR 2025" in text
    assert "Outside the papers' regimes" in text
    for name in ("report.ipynb", "table.csv", "table.md", "table.tex", "paired.csv", "pairwise.csv", "published.csv",
                 "published.md", "outside_paper_regime.csv",
                 *(f"{stem}.{suffix}" for stem in [*FIGURES, "who_beats_whom"] for suffix in ("png", "svg"))):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "report" / "table.csv")
    assert len(table) == 3
    assert "| digits" in (tmp_path / "report" / "table.md").read_text()
    assert r"\begin{table*}" in (tmp_path / "report" / "table.tex").read_text()


def test_render_refuses_a_reference_method_that_did_not_run(runs_root: Path, tmp_path: Path) -> None:
    aggregate(runs_root, tmp_path / "summary.csv", CONFIG)
    with pytest.raises(UserError, match="reference method 'geta' has no budgeted run") as error:
        render(tmp_path / "summary.csv", tmp_path / "report", reference="geta")
    assert error.value.fix == "pass --reference with one of: qat"


PAPER_BENCHMARKS = {("cifar10", "resnet8"), ("cifar10", "resnet20"), ("cifar10", "vgg7"),
                    ("speech_commands", "ds_cnn"), ("tiny_imagenet", "resnet18_64"),
                    ("imagenet", "resnet18"), ("imagenet", "mobilenet_v2"), ("imagenet", "resnet50")}


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["config/config.yaml", "config/paper.yaml"])
def test_snakemake_dry_run_lists_the_whole_grid_without_data(config_file: str, tmp_path: Path) -> None:
    """`snakemake -n` plans every run of the config from a folder with no data and no results."""
    from jpqbench.base.config import load_config
    from jpqbench.pipeline.grid import grid

    config = load_config(PROJECT / config_file)
    points = grid(config)
    for name in ("Snakefile", "config"):  # a fresh folder: no data, no runs
        copy = shutil.copytree if (PROJECT / name).is_dir() else shutil.copy
        copy(PROJECT / name, tmp_path / name)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", config_file],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    budgeted = [p for p in points if p.budget is not None]
    free = [p for p in points if p.budget is None]
    if config.batch_runs:  # one job runs every budget and seed of a (dataset, model, method)
        budgeted, free = ({(p.dataset, p.model, p.method) for p in runs} for runs in (budgeted, free))
    # batched: one rule per dataset (compress_<dataset>, reference_<dataset>), as a dataset may
    # have its own budgets and seeds
    assert sum(int(n) for rule, n in counts.items() if rule.startswith("compress")) == len(budgeted)
    assert sum(int(n) for rule, n in counts.items() if rule.startswith("reference")) == len(free)
    assert int(counts["pretrain"]) == len({(p.dataset, p.model, p.seed) for p in points})
    assert int(counts["prepare"]) == len(config.datasets)
    assert counts["aggregate"] == counts["report"] == "1"
    if config_file.endswith("paper.yaml"):
        assert set(config.benchmarks()) == PAPER_BENCHMARKS
        assert len(config.budgets) >= 5 and len(config.seeds) >= 3
    else:
        assert {"digits", "minispeech"} <= set(config.datasets) and len(config.budgets) >= 3


def test_published_numbers_are_labelled_and_sourced() -> None:
    published = read_published()
    assert len(published) >= 10
    assert published["label"].eq("as reported").all() and published["source"].notna().all()
    assert {"geta", "djpq", "ajpq", "cwmpq"} <= set(published["method"])
    assert published["method"].str.startswith("noncomm[").sum() >= 4  # the four schedules of the paper
    assert published["top1_pct"].dropna().between(0, 100).all()
    assert published["relative_cost"].dropna().between(0, 1, inclusive="neither").all()


def test_unlabelled_or_malformed_published_rows_are_refused(tmp_path: Path) -> None:
    rows = PUBLISHED.read_text().splitlines()
    bad = tmp_path / "published.csv"
    bad.write_text("\n".join([rows[0], rows[1], rows[2].replace("as reported,", "ours,", 1)]) + "\n")
    with pytest.raises(UserError, match=r"rows \[3\] are not labelled 'as reported'"):
        read_published(bad)
    bad.write_text("label,dataset,top1\nas reported,cifar10,91\n")
    with pytest.raises(UserError, match="has columns"):
        read_published(bad)


def test_published_rows_sit_beside_our_nearest_budget_never_merged(runs_root: Path, tmp_path: Path) -> None:
    table = comparison_table(aggregate(runs_root, tmp_path / "summary.csv", CONFIG))
    published = pd.DataFrame([
        {"label": "as reported", "dataset": "digits", "model": "digits_cnn", "method": "qat", "setting": "w4a4",
         "budget_metric": "bops", "relative_cost": 0.04, "top1_pct": 97.5, "source": "a paper"},
        {"label": "as reported", "dataset": "cifar10", "model": "resnet20", "method": "qat", "setting": "",
         "budget_metric": "bops", "relative_cost": 0.04, "top1_pct": 91.0, "source": "another paper"},
    ], columns=list(PUBLISHED_COLUMNS))
    beside = published_beside_ours(published, table)
    assert len(beside) == 2 and list(beside["top1_pct"]) == [97.5, 91.0]  # theirs, untouched
    assert beside.loc[0, "ours_budget"] == 0.05  # nearest of our budgets 0.02 / 0.05 to 0.04
    assert beside.loc[0, "ours_top1_mean_pct"] == pytest.approx(92.0)
    assert pd.isna(beside.loc[1, "ours_top1_mean_pct"])  # not in our grid: left empty
