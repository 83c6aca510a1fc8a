"""MLflow tracking: one MLflow run per harness run (pretraining or compression).

The tracking URI is, in order: ``MLFLOW_TRACKING_URI`` from the environment, the config's
``tracking_uri``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so every Snakemake job
writes to the same file). ``jpqbench init-tracking`` creates the database and experiment
once, before parallel jobs start: concurrent first use of a SQLite store races on its
schema migration.

A run that is interrupted and restarted reuses its MLflow run (its id is kept in the run's
work folder), so a resumed run never appears twice. Runs end with status FINISHED or
FAILED; a failed run keeps its error message as the tag ``error``.
"""
from __future__ import annotations

import os
import time
import platform
import subprocess
from contextlib import contextmanager
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from jpqbench.config import BenchConfig
from jpqbench.distributed import is_main_process, world_size

PACKAGES = {"torch": "torch", "torchvision": "torchvision", "torchaudio": "torchaudio",
            "torch_pruning": "torch-pruning", "mlflow": "mlflow", "numpy": "numpy"}


def tracking_uri(config: BenchConfig | None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is not None and config.tracking_uri:
        return config.tracking_uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def init_tracking(config: BenchConfig) -> str:
    """Create the store and the experiment (idempotent). Returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(config.experiment)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers: from the module when it is
    already imported (cheap), else from the installed distribution's metadata."""
    versions = {"python": platform.python_version()}
    for module, distribution in PACKAGES.items():
        if module in sys.modules:
            versions[distribution] = getattr(sys.modules[module], "__version__", "unknown")
            continue
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[distribution] = "absent"
    return versions


class Tracker:
    """A thin wrapper over one active MLflow run."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow.entities

        stamp = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(key, float(value), stamp, step)
                                                     for key, value in metrics.items() if value is not None])

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow.entities

        self._client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow.entities

        self._client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self._client.log_artifact(self.run_id, str(path))


class NullTracker(Tracker):
    """What the ranks other than 0 of a torchrun launch log to: nothing (rank 0 logs the run)."""

    def __init__(self) -> None:
        super().__init__(None, "")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


@contextmanager
def tracked_run(config: BenchConfig, run_name: str, id_file: Path, tags: dict[str, Any]) -> Iterator[Tracker]:
    """Start (or resume, when ``id_file`` holds an unfinished run's id) an MLflow run."""
    if not is_main_process():
        yield NullTracker()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment)
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
        except mlflow.exceptions.MlflowException:
            run_id = None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    tracker = Tracker(client, run_id)
    tracker.set_tags({**tags, "git_commit": git_commit(), "torch_threads": torch.get_num_threads(),
                      "processes": world_size(),
                      **{f"version.{k}": v for k, v in package_versions().items()}})
    try:
        yield tracker
    except BaseException as error:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status="FAILED" if isinstance(error, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, status="FINISHED")
