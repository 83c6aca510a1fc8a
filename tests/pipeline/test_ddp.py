"""Data-parallel training under torchrun (jpqbench.harness.distributed), with gloo and 2 CPU processes.

* what rank 0 decides before a run (:func:`jpqbench.harness.distributed.agree`) reaches every rank, and
  its failure is raised on every rank (no hang); process groups made one after the other do not
  interfere;
* fit in 2 ranks: the ranks end bit-identical, batch-norm statistics included; the first step's averaged gradient is the
  gradient of one process on the union of the two ranks' batches (the recipe's batch_size is
  the global batch), and the step count and schedule are a single-process run's; a statistic
  that decides something (noncomm's activation magnitudes and quantization errors) is the
  union batch's on every rank;
* `jpqbench run --nproc 2` (torchrun) on a real method: the run completes, metrics.json is
  written once and MLflow holds exactly one run for it; every built-in method runs under 2
  ranks and its ranks end with the same model and plan, and a method whose ranks differ fails;
* a method declaring ``distributed = False``, or a batch that does not split evenly, is
  refused before any work, with the fix.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from paths import REPO_ROOT
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.base.registry import METHODS
from jpqbench.blocks.noncomm.qsparse import ActivationPQ
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.distributed import agree, training_group
from jpqbench.harness.train import TrainHooks, TrainSpec, fit

WORLD = 2
SPEC = TrainSpec(epochs=2, lr=0.1, batch_size=16, optimizer="sgd", momentum=0.9, weight_decay=0.0)


def _data() -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(60, 6, generator=generator)  # 60: not a multiple of the global batch
    split = TensorSplit(inputs, (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long())
    return DataBundle("toy", split, split, split, num_classes=3, input_shape=(6,), default_model="")


def _model() -> nn.Module:
    torch.manual_seed(0)  # no batch norm: a step on the union batch is then exactly DDP's step
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _bn_model() -> nn.Module:
    torch.manual_seed(1)  # batch norm: running statistics are buffers, updated by each rank's own batches
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class _Recorder(TrainHooks):
    """Records the first training batch a process sees, the gradients of the first step and
    how many optimizer steps were taken."""

    def __init__(self, model: nn.Module) -> None:
        self.batch: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []
        self.steps = 0
        model.register_forward_pre_hook(self._see)

    def _see(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training and self.batch is None:
            self.batch = args[0].clone()

    def after_step(self, model: nn.Module, step: int) -> None:
        if step == 0:
            self.grads = [param.grad.clone() for param in model.parameters()]
        self.steps += 1


def _train(model: nn.Module, checkpoint: Path) -> dict:
    recorder = _Recorder(model)
    result = fit(model, _data(), SPEC, seed=0, phase="p", checkpoint=checkpoint, hooks=recorder)
    return {"state": model.state_dict(), "batch": recorder.batch, "grads": recorder.grads,
            "steps": recorder.steps, "history": result.history}


def _refuse() -> None:
    raise UserError("rank 0 refuses", "fix it")


def _observer() -> tuple[nn.Module, ActivationPQ]:
    """A layer and noncomm's activation pruner-quantizer after it, armed to gather its statistics."""
    torch.manual_seed(2)
    pq = ActivationPQ(torch.Size([4]), bits=4, decimals=range(0, 8), prunable=True)
    pq.arm(observe_magnitude=True, observe=True)
    return nn.Sequential(nn.Linear(6, 4), pq).train(), pq


def _share(rank: int) -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(10 + rank))


def _observe_share(rank: int) -> dict[str, torch.Tensor]:
    """Each rank shows the observer its own share of a batch, inside a training phase (DDP)."""
    model, pq = _observer()
    with training_group(model) as ddp:
        ddp(_share(rank)).sum().backward()
    return {"magnitude_sum": pq.magnitude_sum, "magnitude_count": pq.magnitude_count, "errors": pq.quantizer.errors}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    decided = agree(lambda: f"rank 0's pid {os.getpid()}")
    try:
        agree(_refuse)
        refused = None
    except UserError as error:
        refused = (error.problem, error.fix)
    trained = _train(_model(), Path(out) / "train.pt")
    bn_model = _bn_model()
    fit(bn_model, _data(), SPEC, seed=0, phase="bn")
    torch.save({**trained, "bn_state": bn_model.state_dict(), "decided": decided, "refused": refused,
                "observed": _observe_share(rank)}, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # ~30 s: two spawned processes import torch
def test_two_ranks_stay_identical_and_step_on_the_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert ranks[0]["decided"] == ranks[1]["decided"] and ranks[0]["decided"].startswith("rank 0's pid")
    assert ranks[0]["refused"] == ranks[1]["refused"] == ("rank 0 refuses", "fix it")

    for state in ("state", "bn_state"):  # parameters and buffers (batch-norm statistics) alike
        for key, value in ranks[0][state].items():
            assert torch.equal(value, ranks[1][state][key]), f"ranks differ in {key}"
    assert (tmp_path / "train.pt").is_file()  # rank 0's epoch checkpoint

    # each rank took half the global batch, from disjoint shards
    halves = [r["batch"] for r in ranks]
    assert [len(h) for h in halves] == [SPEC.batch_size // WORLD] * WORLD
    union = torch.cat(halves)
    assert len({tuple(row.tolist()) for row in union}) == SPEC.batch_size
    # DDP's averaged first-step gradient == one process's gradient on the union batch
    inputs = _data().train.inputs
    targets = _data().train.targets
    rows = [int(torch.nonzero((inputs == row).all(1))[0]) for row in union]
    reference = _model()
    F.cross_entropy(reference(inputs[rows]), targets[rows]).backward()
    for grad, expected in zip(ranks[0]["grads"], [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)

    single = _train(_model(), tmp_path / "single.pt")
    assert ranks[0]["steps"] == ranks[1]["steps"] == single["steps"] == SPEC.epochs * 4  # ceil(60 / 16)
    assert [h["lr"] for h in ranks[0]["history"]] == pytest.approx([h["lr"] for h in single["history"]])
    # the epoch figures are summed over both shards, so every rank logs the same
    assert 0.0 <= ranks[0]["history"][-1]["train_top1"] == ranks[1]["history"][-1]["train_top1"] <= 1.0

    # statistics that decide (noncomm's activation masks and fractional bits) are the whole batch's on every rank
    model, pq = _observer()
    model(torch.cat([_share(rank) for rank in range(WORLD)]))
    for key, expected in {"magnitude_sum": pq.magnitude_sum, "magnitude_count": pq.magnitude_count,
                          "errors": pq.quantizer.errors}.items():
        assert torch.equal(ranks[0]["observed"][key], ranks[1]["observed"][key]), key
        torch.testing.assert_close(ranks[0]["observed"][key], expected, rtol=1e-6, atol=0.0)


def _run_args(workspace, *extra: str) -> list[str]:
    return ["--config", str(workspace.config), "run", "--dataset", "digits", "--seed", "0",
            "--checkpoint", str(workspace.checkpoint), *extra]


@pytest.mark.slow
def test_nproc_2_runs_a_method_under_torchrun_and_records_it_once(digits_workspace, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "jpqbench.pipeline.cli", *_run_args(
        digits_workspace, "--method", "qat", "--budget", "0.05", "--out", str(out), "--nproc", "2")],
        capture_output=True, text=True, env=env, cwd=digits_workspace.root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["target_met"]
    written = {path.name for path in out.iterdir()}
    assert {"metrics.json", "plan.json", "model.pt"} <= written
    assert ".work" not in written and not any(name.endswith(".tmp") for name in written)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(digits_workspace.tracking_uri)
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id], "tags.processes = '2'")
    assert len(runs) == 1, "a distributed run is recorded once, by rank 0"
    assert runs[0].info.run_id == metrics["mlflow_run_id"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["top1"] == pytest.approx(metrics["top1"])


@pytest.mark.slow  # ~60 s: 11 methods in one launch of 2 ranks
def test_every_builtin_method_runs_distributed_and_its_ranks_agree(digits_workspace, tmp_path: Path) -> None:
    """Pretraining and each method under 2 ranks end with the same model (and plan) on both (the
    harness compares them before rank 0 alone evaluates and writes); a method whose ranks differ
    is refused."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    driver = REPO_ROOT / "tests" / "ddp_every_method.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(driver), str(digits_workspace.config), str(digits_workspace.checkpoint), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=digits_workspace.root)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert set(outcomes) == {"pretrain", "rank_dependent", *METHODS.names()}
    assert outcomes.pop("pretrain") == "status 0" and (tmp_path / "pretrained.pt").is_file()
    refused = outcomes.pop("rank_dependent")
    assert refused.startswith("error: the ranks ended the method with different models or plans (ranks [1] differ")
    assert not (tmp_path / "rank_dependent" / "metrics.json").exists()
    expected = {method: "status 0: ok, target met " + ("None" if method == "fp32" else "True") for method in outcomes}
    assert outcomes == expected


@pytest.fixture
def single_process_ptq(monkeypatch: pytest.MonkeyPatch):
    from jpqbench.base.method_spec import get_method

    monkeypatch.setattr(get_method("ptq"), "distributed", False)


def test_a_single_process_method_is_refused_before_launch(digits_workspace, single_process_ptq, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from jpqbench.pipeline.cli import main

    out = tmp_path / "ptq"
    assert main(_run_args(digits_workspace, "--method", "ptq", "--budget", "0.05", "--out", str(out),
                          "--nproc", "2")) == 2
    error = capsys.readouterr().err
    assert "'ptq' runs in a single process only" in error and "fix: run it without torchrun" in error
    assert not out.exists()


def test_a_single_process_method_is_refused_under_torchrun(digits_workspace, single_process_ptq, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from jpqbench.pipeline.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in every process it starts
    monkeypatch.setenv("RANK", "1")
    assert main(_run_args(digits_workspace, "--method", "ptq", "--budget", "0.05", "--out",
                          str(tmp_path / "ptq"))) == 2
    assert "'ptq' runs in a single process only" in capsys.readouterr().err


def test_a_global_batch_that_does_not_split_is_refused(digits_workspace, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from jpqbench.pipeline.cli import main

    assert main(_run_args(digits_workspace, "--method", "ptq", "--budget", "0.05", "--out", str(tmp_path / "p"),
                          "--nproc", "3")) == 2
    assert "batch_size 64 (the global batch) does not divide by the 3 processes" in capsys.readouterr().err
