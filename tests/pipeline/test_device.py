"""Device placement (the config's ``device``): what can be checked on the CPU runs everywhere; the
CUDA runs skip, with the reason, where torch sees no GPU.

* resolution: ``cpu`` is the CPU, ``auto`` is the GPU of the process's local rank when there is
  one, else the CPU; ``cuda`` without a GPU, or more processes than GPUs, is refused before any
  work with the problem and the fix;
* ``device: cpu`` gives bit-identical results to the default on a machine without a GPU, and
  the device is recorded in metrics.json and MLflow;
* the data bundle delivers every batch on its device (checked with the ``meta`` device, which
  every torch build has);
* on a GPU: every built-in method runs on ``cuda`` (its plan verified, its cost counted, its
  artifact exported, model.pt loadable without a GPU), and with two GPUs DDP trains over nccl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DigitsWorkspace, create_experiment, write_config

from jpqbench.base.errors import UserError
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.distributed import describe_device, resolve_device
from jpqbench.nn.layers import make_compressible, mask_batchnorm, module_device
from jpqbench.pipeline.cli import main

NO_CUDA = "torch sees no CUDA GPU on this machine"
BUDGET = 0.05
EPOCHS = 2  # the sequential baselines spend one epoch per stage
VOLATILE = {"mlflow_run_id", "git_commit"}


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every run here logs to the workspace's MLflow store."""


def _argv(config: Path, ws: DigitsWorkspace, method: str, out: Path, *extra: str) -> list[str]:
    argv = ["--config", str(config), "run", "--method", method, "--dataset", "digits", "--seed", "0",
            "--epochs", str(EPOCHS), "--checkpoint", str(ws.checkpoint), "--out", str(out), *extra]
    return argv if method == "fp32" else argv + ["--budget", str(BUDGET)]


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k not in VOLATILE and not k.endswith("_time_s") and not k.startswith("latency_")}


def _config(ws: DigitsWorkspace, tmp_path: Path, device: str | None, experiment: str = "t") -> Path:
    extra = f"device: {device}\n" if device else ""
    return write_config(tmp_path / f"config-{device}.yaml", ws.root, data_root=ws.data_root,
                        results_root=tmp_path / "results", experiment=experiment, extra=extra)


# ---------------------------------------------------------------- resolution
def test_cpu_is_the_cpu_and_auto_is_the_local_gpu_if_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert describe_device(torch.device("cpu")) == "cpu"


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logic, with torch told it has two GPUs (no GPU is touched by resolving)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="3 processes on this node need one GPU each, but it has 2"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `device: cuda` is valid here")
def test_cuda_without_a_gpu_is_refused_before_any_work(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    config = _config(digits_workspace, tmp_path, "cuda")
    out = tmp_path / "qat"
    assert main(_argv(config, digits_workspace, "qat", out)) == 2
    error = capsys.readouterr().err
    assert "asks for device: cuda, but torch sees no CUDA GPU" in error
    assert "fix: set `device: cpu` (or `auto`)" in error
    assert not out.exists()
    assert main(["--config", str(config), "pretrain", "--dataset", "digits", "--out", str(tmp_path / "p.pt")]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "p.pt").exists()


def test_more_processes_than_gpus_are_refused_before_torchrun_starts(digits_workspace: DigitsWorkspace,
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("jpqbench.harness.distributed.launch", lambda *a: pytest.fail("torchrun was launched"))
    config = _config(digits_workspace, tmp_path, "auto")
    assert main(_argv(config, digits_workspace, "qat", tmp_path / "q", "--nproc", "2")) == 2
    error = capsys.readouterr().err
    assert "2 processes on this node need one GPU each, but it has 1" in error and "`device: cpu`" in error


def test_an_unknown_device_is_refused_by_the_config(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    config = _config(digits_workspace, tmp_path, "gpu")
    assert main(_argv(config, digits_workspace, "qat", tmp_path / "q")) == 2
    assert "device" in capsys.readouterr().err


# ---------------------------------------------------------------- placement, checked on the CPU
def test_loader_delivers_every_batch_on_the_bundle_device() -> None:
    """``meta`` stands in for a GPU: same order and sizes, every tensor moved; on the CPU nothing is wrapped."""
    inputs = torch.arange(40.0).view(10, 4)
    split = TensorSplit(inputs, torch.arange(10))
    cpu = DataBundle("toy", split, split, split, num_classes=10, input_shape=(4,), default_model="")
    meta = DataBundle("toy", split, split, split, num_classes=10, input_shape=(4,), default_model="",
                      device=torch.device("meta"))
    for shuffle in (False, True):
        generator = (lambda: torch.Generator().manual_seed(3)) if shuffle else (lambda: None)
        plain = list(cpu.loader("train", 4, shuffle=shuffle, generator=generator()))
        moved = list(meta.loader("train", 4, shuffle=shuffle, generator=generator()))
        assert len(meta.loader("train", 4)) == len(plain) == len(moved) == 3
        assert all(x.device.type == "cpu" and y.device.type == "cpu" for x, y in plain)
        assert all(x.device.type == "meta" and y.device.type == "meta" for x, y in moved)
        assert [tuple(x.shape) for x, _ in moved] == [tuple(x.shape) for x, _ in plain]


def test_masks_and_compressible_buffers_are_made_on_the_module_device() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to("meta")
    make_compressible(model)
    assert model[0].out_mask.device.type == "meta"
    mask_batchnorm(model[1], torch.ones(4))  # made on the CPU, kept on BN's device
    assert model[1].channel_mask.device.type == "meta"
    assert module_device(model) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is CUDA on this machine")
def test_device_cpu_is_bit_identical_to_the_default_and_recorded(digits_workspace: DigitsWorkspace,
                                                                 tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    outs = {}
    for device in (None, "cpu"):
        outs[device] = tmp_path / f"run-{device}"
        assert main(_argv(_config(digits_workspace, tmp_path, device), digits_workspace, "qat", outs[device])) == 0
    default, cpu = (json.loads((outs[d] / "metrics.json").read_text()) for d in (None, "cpu"))
    assert _stable(default) == _stable(cpu)
    assert default["device"] == cpu["device"] == "cpu"
    states = [torch.load(outs[d] / "model.pt", weights_only=False)["model"].state_dict() for d in (None, "cpu")]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    run = MlflowClient(digits_workspace.tracking_uri).get_run(cpu["mlflow_run_id"])
    assert run.data.params["device"] == "cpu"


# ---------------------------------------------------------------- on a GPU
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_every_builtin_method_runs_on_cuda(digits_workspace: DigitsWorkspace, tmp_path: Path) -> None:
    from jpqbench.accounting.counter import count
    from jpqbench.accounting.plan import CompressionPlan
    from jpqbench.base.registry import DATASETS, METHODS

    shape = tuple(DATASETS.get("digits").input_shape)
    config = _config(digits_workspace, tmp_path, "cuda")
    name = torch.cuda.get_device_name(0)
    failures = {}
    for method in METHODS.names():
        out = tmp_path / method
        try:
            status = main(_argv(config, digits_workspace, method, out))
        except Exception as error:  # noqa: BLE001 -- collect every method's failure, not only the first
            failures[method] = f"{type(error).__name__}: {error}"
            continue
        if status != 0:
            failures[method] = f"exit status {status}"
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["device"] == f"cuda:0 ({name})", method
        assert metrics["target_met"] is not False and metrics["artifact_size_ok"], method
        saved = torch.load(out / "model.pt", weights_only=False)  # no map_location: CPU tensors
        assert all(t.device.type == "cpu" for t in saved["model"].state_dict().values()), method
        plan = CompressionPlan.from_dict(saved["plan"])
        assert count(saved["model"], shape, plan).relative_bops == pytest.approx(metrics["relative_bops"]), method
        assert (out / "model.jpq").is_file(), method
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs two CUDA GPUs")
def test_ddp_over_nccl_on_two_gpus(digits_workspace: DigitsWorkspace, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = _config(digits_workspace, tmp_path, "cuda", experiment="nccl")
    create_experiment(digits_workspace.root, "nccl")
    out = tmp_path / "qat"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "jpqbench.pipeline.cli",
                           *_argv(config, digits_workspace, "qat", out, "--nproc", "2")],
                          capture_output=True, text=True, env=env, cwd=digits_workspace.root)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["device"].startswith("cuda:0 (")
    client = MlflowClient(digits_workspace.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("nccl").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["processes"] == "2"
    assert runs[0].data.params["device"].startswith("cuda:0")
