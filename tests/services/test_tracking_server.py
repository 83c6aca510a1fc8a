"""MLflow on a tracking server with a real PostgreSQL backend, as a cluster uses it.

The test creates a PostgreSQL cluster (initdb) in a temp dir, starts it (pg_ctl) on a free
localhost port, starts `mlflow server --backend-store-uri postgresql://... --artifacts-destination
<dir>` on another, and runs one tiny `jpqbench run` with MLFLOW_TRACKING_URI pointing at the
server. Checked in PostgreSQL itself (not through MLflow): exactly one finished run with the
run's tags, parameters and final metrics, equal to the run's metrics.json, its dataset input
and the experiment's model-training kind; and in the server's artifact store: the plan and
config the run wrote, byte for byte.

Skipped, with the reason, where PostgreSQL's server binaries or psycopg2 are missing
(`scripts/ci-services.sh`, `pip install -e '.[postgres]'`). initdb refuses to run as root:
as root the cluster is created and run as the `postgres` user.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from jpqbench.pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

DATABASE = "mlflow"
USER = "jpq"


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _skip_reason() -> str | None:
    missing = [name for name in ("initdb", "pg_ctl") if _pg_binary(name) is None]
    if missing:
        return f"PostgreSQL server binaries missing ({', '.join(missing)}): run scripts/ci-services.sh as root"
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is missing: pip install -e '.[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as (initdb refuses root)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """As root, run ``command`` as the postgres user (initdb and postgres refuse root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _wait(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on a free localhost port holding an empty database; its URI."""
    # not under pytest's temp root, which only its owner may enter: the postgres user must
    root = Path(tempfile.mkdtemp(prefix="jpqbench-postgres-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
    data, port = root / "data", _free_port()
    subprocess.run(_as_postgres([_pg_binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([_pg_binary("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                                 "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        connection.close()
        yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        subprocess.run(_as_postgres([_pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path, command: str = "server") -> Iterator[str]:
    """`mlflow <command>` (``server``, or ``ui``: what a user starts) on the ``backend`` store, on
    a free localhost port, serving artifacts from the folder ``artifacts`` and writing its output
    to ``log``: its URL, once it answers /health. Stopped (its whole process group) on exit."""
    port = _free_port()
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", command, "--backend-store-uri", backend,
                                   "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"],
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow {command} exited: {log.read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
            except OSError:
                return False

        try:
            _wait(healthy, f"mlflow {command} answered /health", 180)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on the PostgreSQL store, serving artifacts from a local folder: (URL, folder)."""
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    with mlflow_server(postgres, artifacts, artifacts.parent / "mlflow-server.log") as url:
        yield url, artifacts


def test_a_run_logs_to_the_tracking_server_and_lands_in_postgresql(
        digits_workspace, tracking_server: tuple[str, Path], postgres: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jpqbench.pipeline.cli import main

    url, artifact_root = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    out = tmp_path / "ptq"
    assert main(["--config", str(digits_workspace.config), "run", "--method", "ptq", "--dataset", "digits",
                 "--budget", "0.05", "--seed", "0", "--checkpoint", str(digits_workspace.checkpoint),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics["mlflow_run_id"]

    import psycopg2

    with psycopg2.connect(postgres) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status, experiment_id FROM runs")
        runs = cursor.fetchall()
        assert [(run, status) for run, status, _ in runs] == [(run_id, "FINISHED")]
        experiment_id = runs[0][2]
        cursor.execute("SELECT key, value FROM tags WHERE run_uuid = %s", (run_id,))
        tags = dict(cursor.fetchall())
        cursor.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        params = dict(cursor.fetchall())
        cursor.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = %s", (run_id,))
        logged = dict(cursor.fetchall())
        cursor.execute("SELECT key, value FROM experiment_tags WHERE experiment_id = %s", (experiment_id,))
        experiment_tags = dict(cursor.fetchall())
        cursor.execute("SELECT name, digest FROM datasets JOIN inputs ON inputs.source_id = datasets.dataset_uuid "
                       "WHERE inputs.destination_id = %s", (run_id,))
        datasets = cursor.fetchall()
    assert tags["method"] == "ptq" and tags["stage"] == "compress" and tags["status"] == "ok"
    assert tags["data_hash"] == metrics["data_hash"] and tags["budget"] == "0.05"
    assert params["recipe.batch_size"] == "64" and params["epochs"] == "1"
    for key in ("top1", "relative_bops", "weight_size_kb", "achieved"):
        assert logged[key] == pytest.approx(metrics[key]), key
    assert experiment_tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert datasets == [("digits", metrics["data_hash"])]

    stored = artifact_root / str(experiment_id) / run_id / "artifacts"
    assert (stored / "plan.json").read_text() == (out / "plan.json").read_text()
    assert "results_root" in (stored / "config.yaml").read_text()
