"""MLflow tracking: one MLflow run per harness run (pretraining or compression).

The tracking URI is, in order: ``MLFLOW_TRACKING_URI`` from the environment, the config's
``tracking_uri``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so every Snakemake job
writes to the same file). ``jpqbench init-tracking`` creates the database and experiment
once, before parallel jobs start: concurrent first use of a SQLite store races on its
schema migration.

A run that is interrupted and restarted reuses its MLflow run (its id is kept in the run's
work folder), so a resumed run never appears twice, and a metric value the interrupted
attempt already logged at a step is not logged again when the resumed attempt recomputes it.
Runs end with status FINISHED, FAILED (the tag ``error`` keeps the message; ``status`` is
``diverged`` for a non-finite loss, else ``failed``) or KILLED (interrupted: Ctrl-C, or SIGTERM,
which the CLI turns into an exception so the run can record it). A run killed outright
(SIGKILL) stays RUNNING until its rerun resumes it.

Parallel jobs share one SQLite file. SQLite serialises writers: a SQLite URI is opened with a
busy timeout of :data:`SQLITE_BUSY_TIMEOUT_S` (unless it names a ``timeout``), and a store call
that still meets "database is locked" -- SQLite answers so at once, without waiting, where a
wait could deadlock two writers -- is retried with back-off (:class:`RetryingClient`).

The experiment is a model-training experiment (:data:`EXPERIMENT_KIND_TAG`), each run records
the prepared dataset it used as an MLflow dataset input (:meth:`Tracker.log_dataset`) and the
harness command it belongs to as its MLflow source; ``docs/tracking.md`` lists what a run logs.
"""
from __future__ import annotations

import os
import platform
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from jpqbench.base import atomic
from jpqbench.base.config import BenchConfig
from jpqbench.harness.distributed import is_main_process, world_size

PACKAGES = {"torch": "torch", "torchvision": "torchvision", "torchaudio": "torchaudio",
            "torch_pruning": "torch-pruning", "mlflow": "mlflow", "numpy": "numpy"}


def tracking_uri(config: BenchConfig | None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is not None and config.tracking_uri:
        return config.tracking_uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


SQLITE_BUSY_TIMEOUT_S = 60  # how long SQLite itself waits for another job's write to end
LOCKED_RETRY_S = 600  # how long a store call is retried while SQLite reports a lock


def store_uri(uri: str) -> str:
    """``uri`` as a client opens it: a SQLite URI gets a busy timeout unless it names one
    (sqlite3's default of 5 s is short when several jobs write to one file)."""
    if not uri.startswith("sqlite:") or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_TIMEOUT_S}"


def _retried(function: Any) -> Any:
    """``function``, called again with back-off while it fails because the SQLite store is locked.

    Safe because a store call that fails so changed nothing: its transaction was rolled back.
    Any other error is raised at once.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        deadline, pause = time.monotonic() + LOCKED_RETRY_S, 0.02
        while True:
            try:
                return function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 -- MLflow raises SQLAlchemy's error, wrapped or not
                if "database is locked" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(pause * random.uniform(0.5, 1.5))  # jitter: waiting jobs do not retry in step
            pause = min(2 * pause, 0.5)

    return call


class RetryingClient:
    """An ``MlflowClient`` on ``uri`` (see :func:`store_uri`) whose every call -- opening the
    store included -- is retried while the SQLite store reports a lock."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self._client = _retried(MlflowClient)(store_uri(uri))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        return _retried(attribute) if callable(attribute) else attribute


# The kind MLflow 3 records for an experiment, and the kind of ours: model training, whose page is
# the runs table (a GenAI experiment's is its traces). MLflow UIs that read it open the experiment
# on that page; 3.17's goes by its sidebar switch instead (docs/tracking.md)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
LOCAL_DATASET_SOURCE = "local"  # MLflow's source type of a dataset in a local folder (LocalArtifactDatasetSource)


def init_tracking(config: BenchConfig) -> str:
    """Create the store and the experiment (idempotent). Returns the experiment id."""
    return _experiment_id(RetryingClient(tracking_uri(config)), config.experiment)


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing.

    An experiment without a kind -- created by an older jpqbench, or by hand -- is given the
    model-training kind here, so a store made before the tag existed opens on its runs too; a
    kind someone chose for the experiment is left as it is.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        _give_kind(client, experiment.experiment_id)
    return experiment.experiment_id


def _give_kind(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training. Parallel jobs that first use an older store all try
    at once: the store keeps one job's tag and refuses the others' insert of the same key (a
    unique-key error, not a lock), which is no failure once the tag is there."""
    import mlflow

    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except mlflow.exceptions.MlflowException:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            raise


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
    """A thin wrapper over one active MLflow run.

    ``logged``: the values the run already holds, by (key, step) -- those of an interrupted
    attempt, for a resumed run. Logging the same value at the same step again is skipped, so
    the epoch an attempt logged but did not checkpoint before it was killed, and that the
    resumed attempt trains again, appears once in the metric's history.
    """

    def __init__(self, client: Any, run_id: str, logged: dict[tuple[str, int], float] | None = None) -> None:
        self._client = client
        self.run_id = run_id
        self._logged = logged or {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow.entities

        stamp = int(time.time() * 1000)
        fresh = [mlflow.entities.Metric(key, float(value), stamp, step) for key, value in metrics.items()
                 if value is not None and self._logged.get((key, step)) != float(value)]
        if fresh:
            self._client.log_batch(self.run_id, metrics=fresh)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow.entities

        self._client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow.entities

        self._client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def log_dataset(self, name: str, digest: str, source: Path) -> None:
        """Record the prepared dataset the run trains and evaluates on as the run's MLflow dataset
        input: ``name``, ``digest`` (the data's fingerprint, the ``data_hash`` tag) and the folder
        it was read from. MLflow's UI shows it in the runs table's Dataset column and filters runs
        by it. A resumed run logs it again: MLflow keeps one input per dataset and run."""
        import mlflow.entities
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = mlflow.entities.Dataset(name=name, digest=digest, source_type=LOCAL_DATASET_SOURCE,
                                          source=LocalArtifactDatasetSource(str(source.resolve())).to_json())
        self._client.log_inputs(self.run_id, datasets=[mlflow.entities.DatasetInput(dataset)])


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

    def log_dataset(self, name: str, digest: str, source: Path) -> None:
        pass


@contextmanager
def tracked_run(config: BenchConfig, run_name: str, id_file: Path, tags: dict[str, Any],
                entry_point: str | None = None) -> Iterator[Tracker]:
    """Start (or resume, when ``id_file`` holds an unfinished run's id) an MLflow run.

    ``entry_point``: the jpqbench command the run belongs to (``pretrain``, ``run``), recorded as
    the run's MLflow source (see :func:`_source_tags`); None for a run no command of the harness
    makes (a library use), which records none.
    """
    if not is_main_process():
        yield NullTracker()
        return
    import mlflow

    client = RetryingClient(tracking_uri(config))
    experiment_id = _experiment_id(client, config.experiment)
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
        except mlflow.exceptions.MlflowException:
            run_id = None
    if run_id is None:
        # SIGTERM is held back until the id is on disk: a run no id file names could never be resumed
        with _sigterm_deferred():
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(id_file, run_id)
        logged = {}
    else:
        previous = client.get_run(run_id).data
        logged = {(metric.key, metric.step): metric.value for key in previous.metrics
                  for metric in client.get_metric_history(run_id, key)}
        for outcome in {"error", "status"} & set(previous.tags):  # the interrupted attempt's; this one records its own
            client.delete_tag(run_id, outcome)
    tracker = Tracker(client, run_id, logged)
    try:
        commit = git_commit()
        tracker.set_tags({**tags, "git_commit": commit, "torch_threads": torch.get_num_threads(),
                          "processes": world_size(), **_source_tags(entry_point, commit),
                          **{f"version.{k}": v for k, v in package_versions().items()}})
        yield tracker
    except BaseException as error:
        interrupted = not isinstance(error, Exception)  # Ctrl-C, or SIGTERM (the CLI raises SystemExit)
        status = "interrupted" if interrupted else "diverged" if isinstance(error, FloatingPointError) else "failed"
        tracker.set_tags({"error": f"{type(error).__name__}: {error}"[:5000], "status": status})
        client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _source_tags(entry_point: str | None, commit: str) -> dict[str, str]:
    """MLflow's system tags for where a run comes from, which its UI shows as the run's Source
    (``jpqbench <entry_point>``, a local command: jpqbench is no MLflow Project) and Version (the
    commit, unless git does not know it); none without an entry point."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    if entry_point is None:
        return {}
    tags = {MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL), MLFLOW_SOURCE_NAME: f"jpqbench {entry_point}"}
    return tags if commit == "unknown" else {**tags, MLFLOW_GIT_COMMIT: commit}


def abandon_run(config: BenchConfig, id_file: Path, reason: str) -> None:
    """Close the MLflow run ``id_file`` names -- an attempt that will not be resumed -- as KILLED,
    unless it finished (a finished run of other inputs stays as it is)."""
    import mlflow

    if not id_file.is_file():
        return
    client, run_id = RetryingClient(tracking_uri(config)), id_file.read_text().strip()
    try:
        if client.get_run(run_id).info.status != "FINISHED":
            client.set_tag(run_id, "error", f"abandoned: {reason}")
            client.set_terminated(run_id, status="KILLED")
    except mlflow.exceptions.MlflowException:  # the run is not in this store (e.g. another tracking URI)
        pass


@contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back for the block (it is delivered when the block ends)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
