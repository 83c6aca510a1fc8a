"""Time the default grid from a fresh clone and measure the harness overhead.

    python benchmarks/grid_walltime.py [--cores 2] [--keep DIR]

1. ``git clone`` the current commit into a temporary folder (a fresh clone: no data,
   no results, no MLflow store; the installed environment is reused);
2. run ``snakemake --cores N`` there and time it end to end;
3. read every job's Snakemake benchmark file (the job's wall time, interpreter start-up and
   imports included), every run's ``metrics.json`` and the pretraining checkpoints;
4. print a Markdown section for ``benchmarks/results.md``.

Overhead is measured three ways, each the share of wall time *not* spent in forward,
backward and optimizer steps (``compute_time_s``, timed by the trainer):

* **in-run**: inside ``jpqbench run`` / ``pretrain`` -- data loading, evaluation,
  checkpointing, MLflow logging, cost counting, plan checking;
* **per job**: the whole Snakemake job -- adds Python start-up and the torch / MLflow imports;
* **grid**: cores x grid wall time -- adds Snakemake's scheduling, the data preparation and
  the report.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from jpqbench.pipeline.aggregate import read_summary
from jpqbench.pipeline.report import GROUP_KEYS, comparison_table

REPO = Path(__file__).resolve().parent.parent


def _job_seconds(results: Path) -> dict[str, float]:
    seconds = {}
    for tsv in (results / "benchmarks").rglob("*.tsv"):
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        seconds[str(tsv.relative_to(results / "benchmarks").with_suffix(""))] = float(row["s"])
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="clone into this folder and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="jpqbench-grid-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(workdir)], check=True)
    start = time.perf_counter()
    # the clone's own code, not whichever checkout the environment's editable install points at
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["snakemake", "--cores", str(args.cores), "--quiet", "all"], cwd=workdir, env=env, check=True)
    grid_wall = time.perf_counter() - start

    results = workdir / "results"
    jobs = _job_seconds(results)
    runs = [json.loads(p.read_text()) for p in (results / "runs").rglob("metrics.json")]
    pretrains = [torch.load(p, weights_only=False) for p in (results / "checkpoints").rglob("*.pt")]
    compute = sum(r["compute_time_s"] for r in runs) + sum(p["compute_time_s"] for p in pretrains)
    in_run_wall = sum(r["wall_time_s"] for r in runs) + sum(p["wall_time_s"] for p in pretrains)
    job_wall = sum(jobs.values())
    summary = read_summary(results / "summary.csv")
    table = comparison_table(summary).join(
        summary.groupby(GROUP_KEYS, dropna=False)[["compute_time_s", "search_time_s", "wall_time_s"]].mean()
    ).reset_index()

    print(f"## Default grid (`config/config.yaml`), commit {commit}\n")
    print(f"Command: `python benchmarks/grid_walltime.py --cores {args.cores}` "
          f"(fresh clone, then `snakemake --cores {args.cores}`); {torch.get_num_threads()} torch threads "
          f"available, {len(jobs)} Snakemake jobs with a benchmark file, {len(runs)} compression runs, "
          f"{len(pretrains)} pretrainings.\n")
    startup = job_wall - in_run_wall
    n_jobs = len(jobs)
    print("| figure | value |\n|---|---|")
    print(f"| grid wall time | {grid_wall:.0f} s ({grid_wall / 60:.1f} min; bar: 10 min) |")
    print(f"| training jobs (pretrain, reference, compress: all budgets and seeds of a method) | {n_jobs}, "
          f"{job_wall:.0f} s of job wall time in all |")
    print(f"| compute (forward/backward/step) | {compute:.0f} s ({compute / job_wall:.1%} of job time) |")
    print(f"| harness work in a run (data, evaluation, checkpoints, MLflow, counting, checking) | "
          f"{in_run_wall - compute:.0f} s: **in-run overhead {1 - compute / in_run_wall:.1%}** of run wall time |")
    print(f"| process start-up (Python, torch, MLflow imports) | {startup:.0f} s, {startup / n_jobs:.1f} s per job |")
    print(f"| per-job overhead (start-up + harness work) | {1 - compute / job_wall:.1%} of job wall time |")
    print(f"| grid overhead (cores x wall: adds Snakemake, prepare, aggregate, report) | "
          f"{1 - compute / (args.cores * grid_wall):.1%} |")
    print("\n### Accuracy and cost per method and budget (test top-1 in %, mean and std over seeds)\n")
    print(table.drop(columns=["budget_metric"]).to_markdown(index=False, floatfmt=".4g"))
    if not args.keep:
        print(f"\n(clone left in {workdir} for inspection)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
