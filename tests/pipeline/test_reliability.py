"""Reliability under faults (issue 10): a grid killed mid-job (SIGTERM or SIGKILL of its whole
process group) and rerun ends exactly as an uninterrupted grid, with one finished MLflow run per
grid point; parallel jobs logging to one SQLite store lose nothing; a run that diverges is
recorded as such in metrics.json, MLflow and the summary while the rest of the grid goes on."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
from conftest import DigitsWorkspace, create_experiment, write_config
from paths import REPO_ROOT

from jpqbench.pipeline.cli import main

PROJECT = REPO_ROOT
COPIED = ["Snakefile", "workflow", "config", "analysis", "profiles", "results/reference"]
# the grid of the kill test: the fp32 reference and two trained methods, 4 epochs of 20 steps,
# long enough to be killed while training
GRID_METHODS = "methods: [fp32, qat, prune_then_quantize]"
# figures that measure time (timings, export latencies) or name a run: they differ between any two runs
VOLATILE = re.compile(r"time|latency|_ms$|_s$|mlflow_run_id|git_commit")


# ---------------------------------------------------------------- a grid killed mid-job
def _grid_config(project: Path, experiment: str) -> None:
    """The project's config/config.yaml: the tiny digits grid, its results and data inside the project."""
    config = write_config(project / "config" / "config.yaml", project, data_root=Path("data"),
                          results_root=Path("results"), experiment=experiment)
    config.write_text(config.read_text().replace("methods: [fp32, ptq]", GRID_METHODS)
                      .replace("epochs: 1, batch_size", "epochs: 4, batch_size")
                      .replace("max_steps_per_epoch: 3", "max_steps_per_epoch: 20"))


def _env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}


def _snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["snakemake", "--profile", "profiles/local", "--cores", "2", *args], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=900)


def _run_files(project: Path) -> list[str]:
    """Every file and folder under results/runs, hidden ones included."""
    runs = project / "results" / "runs"
    return sorted(path.relative_to(runs).as_posix() for path in runs.rglob("*"))


def _summary(project: Path) -> pd.DataFrame:
    from jpqbench.pipeline.aggregate import read_summary

    return read_summary(project / "results" / "summary.csv")


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, list[str]]:
    """A project folder with the tiny grid run once, uninterrupted: (folder, its summary, its run files)."""
    project = tmp_path_factory.mktemp("grid")
    for name in COPIED:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, project / name)
    _grid_config(project, "uninterrupted")
    done = _snakemake(project, "results/summary.csv")
    assert done.returncode == 0, done.stderr[-5000:]
    return project, _summary(project), _run_files(project)


def _start_and_kill_mid_training(project: Path, sig: signal.Signals) -> list[Path]:
    """Start the grid; as soon as a compress job has written its first epoch checkpoint, send
    ``sig`` to Snakemake's whole process group (as a scheduler cancelling the allocation does).
    Returns the run folders that were training then."""
    runs = project / "results" / "runs"
    with (project / "killed.log").open("w") as log:
        process = subprocess.Popen(["snakemake", "--profile", "profiles/local", "--cores", "2", "results/summary.csv"],
                                   cwd=project, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not (training := list(runs.glob("**/.work/*.pt"))):
                if process.poll() is not None:
                    pytest.fail(f"the grid ended before any job trained:\n{(project / 'killed.log').read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("no job started training in time")
                time.sleep(0.01)
            os.killpg(process.pid, sig)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    deadline = time.monotonic() + 60
    while True:  # every process of the group has ended (jobs included), as after a scheduler's kill
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the killed grid are still alive"
        time.sleep(0.1)
    assert process.returncode != 0
    return sorted({path.parent.parent for path in training})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_grid_reruns_to_the_uninterrupted_result(grid_project, sig: signal.Signals) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from jpqbench.base.config import load_config
    from jpqbench.pipeline.grid import grid

    project, uninterrupted, files = grid_project
    experiment = f"killed-{sig.name}"
    _grid_config(project, experiment)  # a fresh experiment in the same store; data and checkpoint are kept
    shutil.rmtree(project / "results" / "runs")
    (project / "results" / "summary.csv").unlink()

    interrupted = _start_and_kill_mid_training(project, sig)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert interrupted
    for run_dir in interrupted:
        assert not (run_dir / "metrics.json").exists(), "the job finished before the kill"
        run = client.get_run((run_dir / ".work" / "mlflow_run_id").read_text().strip())
        if sig == signal.SIGTERM:  # the job unwound and said so
            assert run.info.status == "KILLED" and run.data.tags["status"] == "interrupted", run.data.tags
        else:  # killed outright: nothing could be recorded
            assert run.info.status == "RUNNING"

    if sig == signal.SIGKILL:  # Snakemake's own lock survives a SIGKILL; its documented remedy
        assert _snakemake(project, "--unlock").returncode == 0
    rerun = _snakemake(project, "results/summary.csv")
    assert rerun.returncode == 0, rerun.stderr[-5000:]

    # every run folder complete and clean: the same files as the uninterrupted grid's, no .work, no .tmp
    assert _run_files(project) == files
    # the same results, exactly (timings and run ids aside)
    resumed = _summary(project)
    stable = [column for column in uninterrupted.columns if not VOLATILE.search(column)]
    assert stable and "top1" in stable and "relative_bops" in stable
    pd.testing.assert_frame_equal(resumed[stable], uninterrupted[stable], check_exact=True)
    # one finished MLflow run per grid point, the one metrics.json names, no result logged twice at a step
    # (timings are measured again by every attempt that runs to the end: a job killed after one of its
    # runs finished has that run's outputs deleted by Snakemake, and the rerun continues its MLflow run)
    config = load_config(project / "config" / "config.yaml")
    points = {point.run_dir(Path()).as_posix(): point.run_dir(project / "results" / "runs") for point in grid(config)}
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               run_view_type=ViewType.ALL)
    assert sorted(run.info.run_name for run in found) == sorted(points)
    for run in found:
        metrics = json.loads((points[run.info.run_name] / "metrics.json").read_text())
        assert run.info.status == "FINISHED" and run.info.run_id == metrics["mlflow_run_id"]
        assert run.data.tags["status"] == "ok" and "error" not in run.data.tags
        for key in (key for key in run.data.metrics if not VOLATILE.search(key)):
            steps = [metric.step for metric in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
    # and nothing left RUNNING or KILLED anywhere in the store
    every = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    assert {run.info.status for run in every} == {"FINISHED"}


# ---------------------------------------------------------------- parallel jobs, one SQLite store
JOBS, STEPS, KEYS, PARAMS = 4, 25, 5, 20


def _log_one_job(config_path: str, work: str, job: int, start: multiprocessing.synchronize.Barrier) -> None:
    """One job's logging, as a run does it: params, a metric batch per step, an artifact, tags."""
    from jpqbench.base.config import load_config
    from jpqbench.pipeline.tracking import tracked_run

    config, work_dir = load_config(config_path), Path(work)
    work_dir.mkdir(parents=True)
    (work_dir / "artifact.txt").write_text(f"job {job}\n")
    start.wait()  # every job begins writing at the same moment
    with tracked_run(config, f"job{job}", work_dir / "mlflow_run_id", {"job": job}) as tracker:
        tracker.log_params({f"p{i}": job * i for i in range(PARAMS)})
        for step in range(STEPS):
            tracker.log_metrics({f"m{k}": job * 1000 + step * 10 + k for k in range(KEYS)}, step)
        tracker.log_artifact(work_dir / "artifact.txt")
        tracker.set_tags({"status": "ok"})


@pytest.mark.slow
def test_parallel_jobs_lose_nothing_in_one_sqlite_store(tmp_path: Path, no_env_tracking_uri) -> None:
    """4 processes log at once to one SQLite file opened with a 1 ms busy timeout, so "database is
    locked" is certain (without the retries, 4 of 6 such jobs died in a trial run); every run, param,
    metric value and artifact must arrive."""
    from mlflow.tracking import MlflowClient

    config = write_config(tmp_path / "c.yaml", tmp_path, experiment="parallel")
    config.write_text(config.read_text().replace("mlflow.db\n", "mlflow.db?timeout=0.001\n"))
    create_experiment(tmp_path, "parallel")
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(JOBS)
    jobs = [spawn.Process(target=_log_one_job, args=(str(config), str(tmp_path / f"job{job}"), job, start))
            for job in range(JOBS)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=600)
    assert [job.exitcode for job in jobs] == [0] * JOBS

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(f"job{job}" for job in range(JOBS))
    for run in runs:
        job = int(run.data.tags["job"])
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
        assert run.data.params == {f"p{i}": str(job * i) for i in range(PARAMS)}
        for k in range(KEYS):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"m{k}"))
            assert history == [(step, float(job * 1000 + step * 10 + k)) for step in range(STEPS)]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["artifact.txt"]


# ---------------------------------------------------------------- divergence
@pytest.mark.slow
def test_a_diverged_run_is_recorded_and_the_grid_goes_on(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                         no_env_tracking_uri) -> None:
    """An absurd fine-tuning learning rate (1e30) makes qat's loss NaN; fp32 and ptq do not train.
    Every job still exits 0, the summary and report are produced, qat is listed as diverged and
    left out of the means and the figures."""
    from mlflow.tracking import MlflowClient

    from jpqbench.base.config import load_config
    from jpqbench.pipeline.grid import grid
    from jpqbench.pipeline.report import comparison_table, pareto_figure

    results = tmp_path / "results"
    config = write_config(tmp_path / "c.yaml", digits_workspace.root, data_root=digits_workspace.data_root,
                          results_root=results, experiment="diverge")
    config.write_text(config.read_text().replace("methods: [fp32, ptq]", "methods: [fp32, ptq, qat]")
                      .replace("finetune_lr: 0.01", "finetune_lr: 1.0e+30"))
    create_experiment(digits_workspace.root, "diverge")
    for point in grid(load_config(config)):
        budget = ["--budget", str(point.budget.target)] if point.budget else []
        assert main(["--config", str(config), "run", "--method", point.method, "--dataset", "digits", "--seed", "0",
                     "--checkpoint", str(digits_workspace.checkpoint), *budget]) == 0, point
    summary_csv = results / "summary.csv"
    assert main(["--config", str(config), "aggregate", "--out", str(summary_csv)]) == 0
    assert main(["report", "--summary", str(summary_csv), "--out", str(tmp_path / "report")]) == 0

    qat = results / "runs" / "digits" / "digits_cnn" / "qat" / "bops-0.05" / "s0"
    record = json.loads((qat / "metrics.json").read_text())
    assert record["status"] == "diverged" and "loss became nan" in record["error"]
    assert record["top1"] is None and record["relative_bops"] is None
    # no plan or model to trust, no .work; the inputs and MLflow run id kept for a rerun
    assert sorted(path.name for path in qat.iterdir()) == [".inputs.json", ".mlflow_run_id", "metrics.json"]
    run = MlflowClient(digits_workspace.tracking_uri).get_run(record["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"
    assert "FloatingPointError: loss became nan" in run.data.tags["error"]

    from jpqbench.pipeline.aggregate import read_summary

    summary = read_summary(summary_csv).set_index("method")
    assert summary["status"].to_dict() == {"fp32": "ok", "ptq": "ok", "qat": "diverged"}
    assert summary.loc["qat", "error"] == record["error"]
    table = comparison_table(summary.reset_index()).reset_index().set_index("method")
    assert (table.loc["qat", "failed"], table.loc["qat", "seeds"]) == (1, 0)
    assert pd.isna(table.loc["qat", "top1_mean_pct"]) and table.loc["ptq", "seeds"] == 1
    figure = pareto_figure(comparison_table(summary.reset_index()), "relative_bops", "BOPs")
    labels = [text.get_text() for ax in figure.axes for text in ax.get_legend().get_texts()]
    assert "ptq" in labels and not any(label.startswith("qat") for label in labels), labels
    failed = pd.read_csv(tmp_path / "report" / "failed.csv")
    assert failed[["method", "status"]].values.tolist() == [["qat", "diverged"]]
    assert "diverged" in (tmp_path / "report" / "report.html").read_text()


# ---------------------------------------------------------------- SIGTERM through `jpqbench run --nproc`
NPROC_EPOCHS = 40  # 3 steps each: the run is still training when its first epoch checkpoint appears


def _nproc_argv(config: Path, ws: DigitsWorkspace, out: Path) -> list[str]:
    return ["-m", "jpqbench.pipeline.cli", "--config", str(config), "run", "--method", "qat", "--dataset", "digits",
            "--seed", "0", "--checkpoint", str(ws.checkpoint), "--budget", "0.05", "--epochs", str(NPROC_EPOCHS),
            "--out", str(out), "--nproc", "2"]


def _processes_naming(text: str) -> dict[int, str]:
    """pid -> command line of the live processes that mention ``text`` (torchrun and its workers name the run folder)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if any(text.encode() in arg for arg in args):
            found[int(cmdline.parent.name)] = b" ".join(args).decode(errors="replace")
    return found


@pytest.fixture
def reap(tmp_path: Path) -> Iterator[None]:
    """After the test, SIGKILL whatever process still names its folder: a failing test must not
    leave torchrun workers blocked in a collective for the rest of the session."""
    yield
    for pid in _processes_naming(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # four torchrun launches of 2 processes: ~1-2 min on 2 cores
def test_sigterm_to_nproc_leaves_no_worker_and_reruns_resume_then_skip(digits_workspace: DigitsWorkspace,
                                                                         tmp_path: Path, reap: None) -> None:
    """SIGTERM to `jpqbench run --nproc 2` mid-training: the parent exits 143 and no torchrun or
    worker process is left; a rerun (--nproc 2) resumes the same MLflow run to the result of an
    uninterrupted --nproc 2 run; a rerun of the finished run returns at once with status 0,
    training nothing and logging nothing."""
    from mlflow.tracking import MlflowClient

    env = {**_env(), "OMP_NUM_THREADS": "1"}
    configs = {}
    for name in ("reference", "killed"):
        create_experiment(digits_workspace.root, f"nproc-{name}")
        configs[name] = write_config(tmp_path / f"{name}.yaml", digits_workspace.root,
                                     data_root=digits_workspace.data_root, results_root=tmp_path / "results",
                                     experiment=f"nproc-{name}")
    python = sys.executable
    reference, out = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run([python, *_nproc_argv(configs["reference"], digits_workspace, reference)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    log = tmp_path / "killed.log"
    with log.open("wb") as stream:
        process = subprocess.Popen([python, *_nproc_argv(configs["killed"], digits_workspace, out)], env=env,
                                   cwd=tmp_path, stdout=stream, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / ".work" / "qat.pt").exists():
                assert process.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no epoch checkpoint appeared in time"
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert status == 143, log.read_text()[-3000:]
    assert not _processes_naming(str(out)), "torchrun or a worker outlived the SIGTERM"
    assert not (out / "metrics.json").exists(), "the run finished before the SIGTERM reached it"
    client = MlflowClient(digits_workspace.tracking_uri)
    interrupted = client.get_run((out / ".work" / "mlflow_run_id").read_text().strip())
    assert interrupted.info.status != "FINISHED"

    done = subprocess.run([python, *_nproc_argv(configs["killed"], digits_workspace, out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:6000]
    resumed, uninterrupted = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    stable = [key for key in uninterrupted if not VOLATILE.search(key)]
    assert "top1" in stable and {k: resumed[k] for k in stable} == {k: uninterrupted[k] for k in stable}
    assert (out / "plan.json").read_text() == (reference / "plan.json").read_text()
    assert resumed["mlflow_run_id"] == interrupted.info.run_id  # the same MLflow run, continued

    recorded = (out / "metrics.json").read_bytes()
    history = len(client.get_metric_history(resumed["mlflow_run_id"], "qat/train_loss"))
    start = time.monotonic()
    done = subprocess.run([python, *_nproc_argv(configs["killed"], digits_workspace, out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished before with the same inputs: not run again" in done.stderr
    assert (out / "metrics.json").read_bytes() == recorded and not (out / ".work").exists()
    assert len(client.get_metric_history(resumed["mlflow_run_id"], "qat/train_loss")) == history
    runs = client.search_runs([client.get_experiment_by_name("nproc-killed").experiment_id])
    assert [run.info.run_id for run in runs] == [resumed["mlflow_run_id"]]
    print(f"rerun of the finished run: {time.monotonic() - start:.1f} s (torchrun start-up included)")
