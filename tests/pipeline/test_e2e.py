"""The whole pipeline on a tiny grid, through the real tools: DVC runs the stages, the grid
stage runs Snakemake, every job calls the `jpqbench` CLI and logs to a real MLflow store.

Grid: 2 methods (qat, prune_then_quantize) x 1 budget x 1 seed on the embedded digits, a few
steps per epoch. Checked: the outputs exist and agree with each other, MLflow holds exactly
one finished run per job with the right tags, metrics and artifacts, Snakemake has nothing
left to do and renders its own report, `dvc status` is clean after `dvc repro`, and `dvc push`
stores the outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from paths import REPO_ROOT

PROJECT = REPO_ROOT
COPIED = ["Snakefile", "dvc.yaml", ".dvcignore", "jpqbench", "config"]

TINY_CONFIG = """\
experiment: e2e
seeds: [0]
budget_metric: bops
budgets: [0.05]
methods: [qat, prune_then_quantize]
datasets:
  digits: {models: {digits_cnn: {}}, pretrain_epochs: 2, epochs: 2, batch_size: 64, lr: 0.05,
           finetune_lr: 0.01, max_steps_per_epoch: 4}
"""


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_grid_through_snakemake_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "project"
    work.mkdir()
    for name in COPIED:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, work / name)
    (work / "config" / "config.yaml").write_text(TINY_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    _run(["git", "init", "-q"], work, env)
    _run(["dvc", "init", "-q"], work, env)
    _run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "dvc-storage")], work, env)

    _run(["dvc", "repro"], work, env)

    summary = pd.read_csv(work / "results" / "summary.csv")
    assert sorted(summary["method"]) == ["prune_then_quantize", "qat"]
    assert (summary["status"] == "ok").all() and summary["target_met"].all()
    assert (summary["relative_bops"] <= 0.05 * 1.10).all()
    for row in summary.itertuples():
        run_dir = work / "results" / "runs" / "digits" / "digits_cnn" / row.method / "bops-0.05" / "s0"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["top1"] == pytest.approx(row.top1)
        assert json.loads((run_dir / "plan.json").read_text())["method"] == row.method
        assert not (run_dir / ".work").exists()
    report = work / "results" / "report"
    assert "<table" in (report / "report.html").read_text()
    for figure in ("pareto_bops.png", "pareto_size.svg", "table.csv", "table.md"):
        assert (report / figure).stat().st_size > 0

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 3  # one pretraining + two compressions, no duplicates
    assert (runs["status"] == "FINISHED").all()
    compress = runs[runs["tags.stage"] == "compress"].set_index("tags.method")
    assert sorted(compress.index) == ["prune_then_quantize", "qat"]
    for method in compress.index:
        assert compress.loc[method, "metrics.top1"] == pytest.approx(
            summary.set_index("method").loc[method, "top1"])
        assert compress.loc[method, "tags.seed"] == "0" and compress.loc[method, "tags.budget"] == "0.05"
        assert compress.loc[method, "run_id"] == summary.set_index("method").loc[method, "mlflow_run_id"]
        artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(compress.loc[method, "run_id"])}
        assert artifacts == {"plan.json", "config.yaml", "model.jpq"}  # the plan, the config, the real artifact

    assert "Nothing to be done" in _run(["snakemake", "-n", "--cores", "1"], work, env)
    _run(["snakemake", "--report", "snakemake-report.zip"], work, env)
    assert (work / "snakemake-report.zip").stat().st_size > 0
    status = _run(["dvc", "status"], work, env)
    assert "up to date" in status.lower(), status
    _run(["dvc", "push", "-q"], work, env)
    assert any((tmp_path / "dvc-storage").rglob("*")), "dvc push stored nothing"

    # a code change re-runs the grid stage, not the grid: Snakemake finds every job up to date
    results = [*(work / "results" / "runs").rglob("metrics.json"), *(work / "results" / "checkpoints").rglob("*.pt")]
    made = {path: path.stat().st_mtime_ns for path in results}
    with open(work / "jpqbench" / "methods" / "uniform.py", "a") as code:
        code.write("# a change to a method's code\n")
    rerun = _run(["dvc", "repro"], work, env)
    assert "Running stage 'grid'" in rerun and "Nothing to be done" in rerun, rerun
    assert {path: path.stat().st_mtime_ns for path in results} == made
    status = _run(["dvc", "status"], work, env)
    assert "up to date" in status.lower(), status
