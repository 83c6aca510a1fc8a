"""Shared fixtures: a prepared digits dataset and its pretrained FP32 checkpoint in a temp folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # the suite runs in one worker per core (pytest -n auto): one torch thread per worker, in
    # the worker and every process a test starts, or the workers' threads oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# ajpq's defaults are HAQ's search (600 episodes, a 10,000-sample reward): the tests' runs search at
# smoke scale, as config/config.yaml does, so that `jpqbench run --method ajpq` takes seconds
AJPQ_SMOKE = "{episodes: 6, warmup_episodes: 2, reward_train_samples: 128, reward_val_samples: 192}"


def write_config(path: Path, root: Path, *, data_root: Path | None = None, experiment: str = "t",
                 results_root: Path | None = None, extra: str = "") -> Path:
    """A tiny digits config (1 pretraining epoch, 1 compression epoch, 3 steps per epoch; ajpq at smoke scale)."""
    path.write_text(
        f"experiment: {experiment}\n"
        f"tracking_uri: sqlite:///{root / 'mlflow.db'}\n"
        f"data_root: {data_root or root / 'data'}\n"
        f"results_root: {results_root or root / 'results'}\n"
        "seeds: [0]\n"
        "budgets: [0.05]\n"
        "methods: [fp32, ptq]\n"
        "datasets: {digits: {models: {digits_cnn: {}}, pretrain_epochs: 1, epochs: 1, batch_size: 64, lr: 0.05,"
        " finetune_lr: 0.01, max_steps_per_epoch: 3}}\n"
        f"method_params: {{ajpq: {AJPQ_SMOKE}}}\n" + extra)
    return path


def create_experiment(root: Path, name: str) -> None:
    """Create the MLflow experiment up front with its artifact folder under ``root``: left to
    itself, MLflow puts a SQLite store's artifacts in ``./mlruns`` of the current directory."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(root / "mlartifacts" / name).as_uri())


@dataclass(frozen=True)
class DigitsWorkspace:
    root: Path
    config: Path
    data_root: Path
    results_root: Path
    tracking_uri: str
    checkpoint: Path


@pytest.fixture(scope="session")
def digits_workspace(tmp_path_factory: pytest.TempPathFactory) -> DigitsWorkspace:
    """digits prepared and digits_cnn pretrained (seed 0) once per session, via the CLI."""
    from jpqbench.pipeline.cli import main

    root = tmp_path_factory.mktemp("digits_ws")
    config = write_config(root / "config.yaml", root)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the config's store, not the caller's
        create_experiment(root, "t")
        assert main(["--config", str(config), "prepare", "--dataset", "digits"]) == 0
        assert main(["--config", str(config), "pretrain", "--dataset", "digits", "--seed", "0"]) == 0
    checkpoint = root / "results" / "checkpoints" / "digits" / "digits_cnn" / "s0.pt"
    assert checkpoint.is_file()
    return DigitsWorkspace(root, config, root / "data", root / "results", f"sqlite:///{root / 'mlflow.db'}",
                           checkpoint)


@pytest.fixture
def no_env_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs log to the config's store even if something set MLFLOW_TRACKING_URI (mlflow.set_tracking_uri does)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
