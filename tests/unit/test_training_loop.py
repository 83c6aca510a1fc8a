"""The training loop at accelerator speed, checked on the simulated GPU (tests/simulated_gpu.py):
a step never makes the host wait for the device (the only reads are the epoch's), divergence is
still caught, compute time is measured with (simulated) CUDA events, and in-memory splits live
on the device."""
from __future__ import annotations

import pytest
import torch
from simulated_gpu import OnGPU, count_host_syncs, simulated_gpu
from torch import nn

import jpqbench.harness.train as train
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.train import TrainHooks, TrainSpec, fit

SAMPLES, BATCH = 64, 8  # 8 steps an epoch


def _bundle() -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(SAMPLES, 1, 4, 4, generator=generator), torch.randint(0, 3, (SAMPLES,), generator=generator))
    return DataBundle("toy", split, split, split, num_classes=3, input_shape=(1, 4, 4), default_model="")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _host_reads(steps: int, epochs: int = 2, hooks: TrainHooks | None = None) -> list[str]:
    """The host reads of device values made by ``epochs`` epochs of ``steps`` steps on the simulated GPU."""
    spec = TrainSpec(epochs=epochs, lr=0.05, batch_size=BATCH, max_steps_per_epoch=steps)
    with simulated_gpu():
        data = _bundle().to(torch.device("cuda"))
        model = _model()
        with count_host_syncs() as reads:
            fit(model, data, spec, seed=0, phase="p", hooks=hooks)
    return reads


def test_a_training_step_reads_nothing_from_the_device() -> None:
    """Reads per epoch: the loss/accuracy sums, the divergence flag, the validation count --
    three, however many steps (the loop before this design read three per step)."""
    four, eight = _host_reads(steps=4), _host_reads(steps=8)
    assert four == eight == ["__bool__", "tolist", "tolist"] * 2


def test_the_divergence_flag_is_read_every_check_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 3)
    reads = _host_reads(steps=8, epochs=1)
    assert reads.count("__bool__") == 3  # after steps 3 and 6, and at the epoch's end (8)


class _NanAt(TrainHooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return torch.tensor(float("nan")) if step == self.step else None


def test_divergence_on_the_gpu_stops_at_the_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 4)
    with pytest.raises(FloatingPointError, match=r"loss became non-finite in phase 'p', epoch 0, at one of steps 4\.\.7$"):
        _host_reads(steps=8, epochs=1, hooks=_NanAt(5))


def test_divergence_on_the_cpu_stops_at_its_step() -> None:
    with pytest.raises(FloatingPointError, match=r"loss became nan in phase 'p', epoch 0, step 5$"):
        fit(_model(), _bundle(), TrainSpec(epochs=1, lr=0.05, batch_size=BATCH), seed=0, phase="p", hooks=_NanAt(5))


def test_gpu_compute_time_comes_from_events_and_the_result_equals_the_cpu_run() -> None:
    spec = TrainSpec(epochs=2, lr=0.05, batch_size=BATCH)
    cpu_model = _model()
    cpu = fit(cpu_model, _bundle(), spec, seed=0, phase="p")
    with simulated_gpu():
        data = _bundle().to(torch.device("cuda"))
        assert isinstance(data.train.inputs, OnGPU)  # resident: the split lives on the device
        gpu_model = _model()
        gpu = fit(gpu_model, data, spec, seed=0, phase="p")
        gpu_state = {k: v.cpu() for k, v in gpu_model.state_dict().items()}
    assert 0 < gpu.compute_s <= gpu.wall_s
    assert gpu.history == cpu.history
    assert all(torch.equal(gpu_state[k], v) for k, v in cpu_model.state_dict().items())


def test_in_memory_splits_stay_on_the_host_when_the_device_is_short_of_memory() -> None:
    with simulated_gpu():
        torch.cuda.mem_get_info = lambda device=None: (1000, 80 << 30)  # restored by simulated_gpu's patch context
        data = _bundle().to(torch.device("cuda"))
        assert not isinstance(data.train.inputs, OnGPU)
        inputs, targets = next(iter(data.loader("train", BATCH)))
        assert isinstance(inputs, OnGPU) and isinstance(targets, OnGPU)  # batches still arrive on the device
