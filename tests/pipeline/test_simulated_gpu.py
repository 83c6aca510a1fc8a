"""Device placement of every method, checked without a GPU on a simulated one (tests/simulated_gpu.py).

* every built-in method, and ``jpqbench pretrain``, runs with ``device: cuda`` on the simulated
  GPU and gives the CPU run's results bit for bit (every metric but ``device``, the saved
  model): no operation met a tensor left on, or made on, the CPU, and nothing was lost on the
  way there and back (the plan check, the cost counter and the export work on CPU copies);
  a run stopped after its first training checkpoint resumes from it on the GPU to the same
  result;
* the simulation is not vacuous: it refuses what a GPU refuses (a CPU operand in a GPU
  operation, ``.numpy()`` of a GPU tensor), keeps the Parameter objects a module had when it
  moves, and a run whose quantizers were never moved to the model's device fails with CUDA's
  message.

What it cannot check -- CUDA kernels, nccl, timings -- tests/pipeline/test_device.py checks on a real GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DigitsWorkspace
from simulated_gpu import NAME, OnGPU, simulated_gpu
from test_device import _argv, _config, _stable

from jpqbench.base.registry import METHODS
from jpqbench.nn.quant import UniformQuantizer
from jpqbench.pipeline.cli import main

MISMATCH = "Expected all tensors to be on the same device"


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every run here logs to the workspace's MLflow store."""


def _saved_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=False)["model"].state_dict()


# ---------------------------------------------------------------- the simulation itself
def test_the_simulated_gpu_refuses_what_a_gpu_refuses() -> None:
    real = torch.cuda.is_available, torch.cuda.get_device_name
    with simulated_gpu():
        layer = torch.nn.Linear(4, 3)
        weight = layer.weight
        layer.to("cuda")
        assert layer.weight is weight and isinstance(weight, OnGPU)  # the same Parameter, now on the GPU
        assert weight.device == torch.device("cuda", 0) and weight.is_cuda and torch.cuda.get_device_name() == NAME
        x = torch.randn(5, 4, device="cuda")
        assert layer(x).device.type == "cuda"
        with pytest.raises(RuntimeError, match=MISMATCH):
            layer(torch.randn(5, 4))  # a batch left on the CPU
        with pytest.raises(RuntimeError, match=MISMATCH):
            torch.nn.Linear(4, 3)(x)  # a module left on the CPU
        with pytest.raises(RuntimeError, match=MISMATCH):
            x * torch.ones(4)  # a tensor made on the CPU
        assert torch.equal((x * torch.tensor(2.0)).cpu(), x.cpu() * 2)  # a CPU scalar is allowed, as on a GPU
        assert torch.equal(x[torch.tensor([0, 2])].cpu(), x.cpu()[[0, 2]])  # so are CPU indices
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        loss = layer(x).square().sum()
        loss.backward()
        assert isinstance(weight.grad, OnGPU)
        assert isinstance(layer.cpu().weight, torch.nn.Parameter) and not isinstance(layer.weight, OnGPU)
    assert (torch.cuda.is_available, torch.cuda.get_device_name) == real  # torch is itself again after the block


def test_a_quantizer_left_on_the_cpu_fails_the_run_on_the_simulated_gpu(digits_workspace: DigitsWorkspace,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """qat with its quantizers never moved to the model's device: the bug a GPU run would hit."""
    monkeypatch.setattr(UniformQuantizer, "to", lambda self, *args, **kwargs: self)
    config = _config(digits_workspace, tmp_path, "cpu")
    assert main(_argv(config, digits_workspace, "qat", tmp_path / "cpu")) == 0  # harmless on the CPU
    out = tmp_path / "gpu"
    with simulated_gpu(), pytest.raises(RuntimeError, match=MISMATCH):
        main(_argv(_config(digits_workspace, tmp_path, "cuda"), digits_workspace, "qat", out))
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------- every method
@pytest.mark.slow  # ~6 s a method: each runs twice
@pytest.mark.parametrize("method", METHODS.names())
def test_every_builtin_method_on_the_simulated_gpu_gives_the_cpu_results(method: str, digits_workspace: DigitsWorkspace,
                                                                        tmp_path: Path) -> None:
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert main(_argv(_config(digits_workspace, tmp_path, "cpu", experiment="cpu"), digits_workspace, method, cpu)) == 0
    with simulated_gpu():
        assert main(_argv(_config(digits_workspace, tmp_path, "cuda", experiment="gpu"), digits_workspace, method,
                          gpu)) == 0
    on_cpu, on_gpu = (json.loads((out / "metrics.json").read_text()) for out in (cpu, gpu))
    assert on_cpu["device"] == "cpu" and on_gpu["device"] == f"cuda:0 ({NAME})"
    assert on_gpu["status"] == "ok"
    assert {k: v for k, v in _stable(on_gpu).items() if k != "device"} == \
        {k: v for k, v in _stable(on_cpu).items() if k != "device"}
    cpu_state, gpu_state = _saved_state(cpu), _saved_state(gpu)
    assert cpu_state.keys() == gpu_state.keys()
    assert all(type(t) is torch.Tensor and torch.equal(t, cpu_state[k]) for k, t in gpu_state.items())  # CPU tensors


def test_a_run_stopped_on_the_simulated_gpu_resumes_to_the_cpu_result(digits_workspace: DigitsWorkspace,
                                                                      tmp_path: Path) -> None:
    """Stopped right after its first training checkpoint (GPU tensors and the CUDA RNG state in
    it), a two-stage run resumes from that checkpoint on the GPU and ends with the CPU run's result."""
    import jpqbench.harness.train

    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    method = "prune_then_quantize"
    assert main(_argv(_config(digits_workspace, tmp_path, "cpu", experiment="cpu"), digits_workspace, method, cpu)) == 0
    argv = _argv(_config(digits_workspace, tmp_path, "cuda", experiment="gpu"), digits_workspace, method, gpu)
    save = jpqbench.harness.train.atomic.torch_save

    def save_then_stop(state: dict, path: Path) -> None:
        save(state, path)
        raise KeyboardInterrupt

    with simulated_gpu():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jpqbench.harness.train.atomic, "torch_save", save_then_stop)
            with pytest.raises(KeyboardInterrupt):
                main(argv)
        assert (gpu / ".work" / "prune.pt").is_file() and not (gpu / "metrics.json").exists()
        assert main(argv) == 0
    on_cpu, on_gpu = (json.loads((out / "metrics.json").read_text()) for out in (cpu, gpu))
    assert {k: v for k, v in _stable(on_gpu).items() if k != "device"} == \
        {k: v for k, v in _stable(on_cpu).items() if k != "device"}


def test_pretraining_on_the_simulated_gpu_gives_the_cpu_checkpoint(digits_workspace: DigitsWorkspace,
                                                                  tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    def pretrain(device: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{device}.pt"
        argv = ["--config", str(_config(digits_workspace, tmp_path, device, experiment=f"pretrain-{device}")),
                "pretrain", "--dataset", "digits", "--out", str(out)]
        assert main(argv) == 0
        return torch.load(out, weights_only=False)["state_dict"]

    on_cpu = pretrain("cpu")
    with simulated_gpu():
        on_gpu = pretrain("cuda")
    client = MlflowClient(digits_workspace.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("pretrain-cuda").experiment_id])[0]
    assert run.data.params["device"] == f"cuda:0 ({NAME})"
    assert on_cpu.keys() == on_gpu.keys()
    assert all(type(t) is torch.Tensor and torch.equal(t, on_cpu[k]) for k, t in on_gpu.items())
