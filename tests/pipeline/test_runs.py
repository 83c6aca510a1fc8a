"""End-to-end compression runs on the embedded digits data: every method meets its budget with an
honest plan, a seed reproduces a run exactly, and a killed run resumes to the same result without
a second MLflow run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DigitsWorkspace, create_experiment, write_config

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.registry import DATASETS
from jpqbench.pipeline.cli import main

pytestmark = pytest.mark.slow

BUDGET = 0.05
EPOCHS = 2  # two epochs, so the sequential baselines have one epoch per stage
RUN_NAME = "digits/digits_cnn/prune_then_quantize/bops-0.05/s0"
# what may differ between two runs of the same seed: timings and bookkeeping (the commit can move
# while the test session runs), never a result
VOLATILE = {"mlflow_run_id", "git_commit"}
# the methods whose search ends in a projection onto the budget -- a greedy fit (cwmpq, djpq), a
# budget wall (ajpq; geta at its freeze) -- and so save searched_plan.json
PROJECTING = {"ajpq", "cwmpq", "djpq", "geta"}


def _argv(ws: DigitsWorkspace, method: str, out: Path, config: Path | None = None, epochs: int = EPOCHS) -> list[str]:
    argv = ["--config", str(config or ws.config), "run", "--method", method, "--dataset", "digits", "--seed", "0",
            "--epochs", str(epochs), "--checkpoint", str(ws.checkpoint), "--out", str(out)]
    return argv if method == "fp32" else argv + ["--budget", str(BUDGET)]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k not in VOLATILE and not k.endswith("_time_s") and not k.startswith("latency_")}


def _methods(capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["list", "methods"]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(digits_workspace: DigitsWorkspace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every registered method, once, at budget 0.05 (fp32 without budget)."""
    from jpqbench.base.registry import METHODS

    root = tmp_path_factory.mktemp("runs")
    outs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for method in METHODS.names():
            outs[method] = root / method
            assert main(_argv(digits_workspace, method, outs[method])) == 0, method
    return outs


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every run here logs to the workspace's MLflow store."""


def test_every_method_meets_its_budget_with_an_honest_plan(runs: dict[str, Path], digits_workspace, capsys) -> None:
    assert set(runs) == set(_methods(capsys))
    data = DATASETS.get("digits")().load(digits_workspace.data_root / "digits")
    batch = next(iter(data.loader("train", 64)))[0]
    for method, out in runs.items():
        metrics = _metrics(out)
        assert metrics["status"] == "ok" and metrics["method"] == method
        assert metrics["epochs"] == EPOCHS and metrics["epochs_used"] <= EPOCHS
        assert 0.0 <= metrics["top1"] <= 1.0
        if method == "fp32":
            assert metrics["relative_bops"] == 1.0 and metrics["relative_size"] == 1.0
            assert metrics["budget"] is None and metrics["target_met"] is None
        else:
            assert metrics["budget"] == BUDGET and metrics["budget_metric"] == "bops"
            assert metrics["relative_bops"] <= BUDGET * 1.10, method
            assert metrics["achieved"] == metrics["relative_bops"]
            assert metrics["target_met"] is True, method
        assert not (out / ".work").exists()
        plan = CompressionPlan.load(out / "plan.json")
        assert plan.method == method
        # the reported figures are reproducible from the artifacts with the one counter, and the plan is true
        saved = torch.load(out / "model.pt", weights_only=False)
        assert CompressionPlan.from_dict(saved["plan"]) == plan
        report = count(saved["model"], data.input_shape, plan)
        assert report.relative_bops == pytest.approx(metrics["relative_bops"], rel=1e-12)
        assert report.weight_bits == pytest.approx(metrics["weight_bits"], rel=1e-12)
        verify_plan(plan, saved["model"], batch)
        # a method that projects its search onto the budget shows what the search itself reached,
        # counted by the same counter from the plan it saved
        searched = out / "searched_plan.json"
        assert searched.is_file() == (method in PROJECTING), method
        if method in PROJECTING:
            recount = count(saved["model"], data.input_shape, CompressionPlan.load(searched))
            assert metrics["searched_relative_bops"] == pytest.approx(recount.relative_bops, rel=1e-12)
            assert metrics["searched_relative_size"] == pytest.approx(recount.relative_size, rel=1e-12)
        else:
            assert metrics["searched_relative_bops"] is None and metrics["searched_relative_size"] is None


def test_a_dataset_and_model_method_params_reach_the_run_and_its_record(digits_workspace: DigitsWorkspace,
                                                                        tmp_path: Path) -> None:
    """datasets.<d>.method_params and datasets.<d>.models.<m>.method_params are what the run uses
    (the model's wins) and what it records: its kept inputs and its MLflow params."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "config.yaml"
    config.write_text(digits_workspace.config.read_text().replace(
        "models: {digits_cnn: {}}",
        "method_params: {prune_then_quantize: {bits: 6, prune_fraction: 0.2}}, "
        "models: {digits_cnn: {method_params: {prune_then_quantize: {bits: 5}}}}").replace(
        "methods: [fp32, ptq]", "methods: [fp32, prune_then_quantize]"))
    out = tmp_path / "run"
    assert main(_argv(digits_workspace, "prune_then_quantize", out, config=config)) == 0
    recorded = json.loads((out / ".inputs.json").read_text())["hparams"]
    assert (recorded["bits"], recorded["prune_fraction"]) == (5, 0.2)
    plan = CompressionPlan.load(out / "plan.json")
    assert {layer.w_bits for layer in plan.layers.values()} - {32} == {5}
    params = MlflowClient(digits_workspace.tracking_uri).get_run(_metrics(out)["mlflow_run_id"]).data.params
    assert (params["hp.bits"], params["hp.prune_fraction"]) == ("5", "0.2")


def test_same_seed_same_result(runs: dict[str, Path], digits_workspace: DigitsWorkspace, tmp_path: Path) -> None:
    first = runs["qat"]
    second = tmp_path / "B"
    assert main(_argv(digits_workspace, "qat", second)) == 0
    a, b = _metrics(first), _metrics(second)
    assert a["mlflow_run_id"] != b["mlflow_run_id"]
    assert _stable(a) == _stable(b)
    assert (first / "plan.json").read_text() == (second / "plan.json").read_text()
    state_a = torch.load(first / "model.pt", weights_only=False)["model"].state_dict()
    state_b = torch.load(second / "model.pt", weights_only=False)["model"].state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_several_budgets_and_seeds_in_one_process_equal_separate_runs(runs: dict[str, Path],
                                                                      digits_workspace: DigitsWorkspace,
                                                                      tmp_path: Path, capsys) -> None:
    """`--budget A --budget B --seed 0 --checkpoint C0 --seed 1 --checkpoint C1` runs all four in
    one process (the batched grid's job), each into its own default folder, and each result
    equals the run of that budget and seed alone: nothing carries over from one run to the next."""
    config = write_config(tmp_path / "config.yaml", digits_workspace.root, data_root=digits_workspace.data_root,
                          results_root=tmp_path / "results")
    checkpoint = str(digits_workspace.checkpoint)
    argv = ["--config", str(config), "run", "--method", "qat", "--dataset", "digits", "--epochs", str(EPOCHS),
            "--budget", "0.02", "--budget", str(BUDGET), "--seed", "0", "--checkpoint", checkpoint,
            "--seed", "1", "--checkpoint", checkpoint]
    assert main(argv) == 0, capsys.readouterr().err
    folder = tmp_path / "results" / "runs" / "digits" / "digits_cnn" / "qat"
    assert {(m["budget"], m["seed"]) for m in map(_metrics, folder.glob("bops-*/s*"))} == {
        (0.02, 0), (BUDGET, 0), (0.02, 1), (BUDGET, 1)}
    assert _stable(_metrics(folder / f"bops-{BUDGET}" / "s0")) == _stable(_metrics(runs["qat"]))
    alone = tmp_path / "seed1"
    seed1 = ["--config", str(config), "run", "--method", "qat", "--dataset", "digits", "--epochs", str(EPOCHS),
             "--budget", str(BUDGET), "--seed", "1", "--checkpoint", checkpoint, "--out", str(alone)]
    assert main(seed1) == 0
    batched = _metrics(folder / f"bops-{BUDGET}" / "s1")
    assert _stable(batched) == _stable(_metrics(alone))
    assert _stable(batched) != {**_stable(_metrics(runs["qat"])), "seed": 1}  # the seed did change the run
    assert main(argv + ["--out", str(tmp_path / "one")]) == 2
    assert "--out names one run folder" in capsys.readouterr().err


def _kill_after_first_checkpoint(argv: list[str], checkpoint: Path, cwd: Path, timeout: float = 300) -> None:
    """Start ``jpqbench run`` in a subprocess and SIGKILL it as soon as ``checkpoint`` exists."""
    log = cwd / "killed_run.log"
    with log.open("wb") as stream:
        process = subprocess.Popen([sys.executable, "-m", "jpqbench.pipeline.cli", *argv], cwd=cwd,
                                   stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not checkpoint.exists():
                if process.poll() is not None:
                    pytest.fail(f"run ended before its first checkpoint:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("no phase checkpoint appeared in time")
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run was not killed:\n{log.read_text()[-3000:]}"


@pytest.mark.parametrize("epochs", [2, 4], ids=["after-first-stage", "mid-first-stage"])
def test_killed_run_resumes_to_the_uninterrupted_result(runs: dict[str, Path], digits_workspace: DigitsWorkspace,
                                                         tmp_path: Path, epochs: int) -> None:
    """prune_then_quantize spends epochs/2 on each stage; the run is SIGKILLed as soon as the pruning
    stage's first epoch checkpoint exists (with 2 epochs: the stage is complete; with 4: it is half done)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    if epochs == EPOCHS:
        reference = runs["prune_then_quantize"]
    else:
        reference = tmp_path / "reference"
        assert main(_argv(digits_workspace, "prune_then_quantize", reference, epochs=epochs)) == 0
    # a separate experiment (same store), so only the interrupted run carries RUN_NAME there
    experiment = f"resume{epochs}"
    config = write_config(tmp_path / "resume.yaml", digits_workspace.root, experiment=experiment)
    create_experiment(digits_workspace.root, experiment)
    out = tmp_path / "A"
    argv = _argv(digits_workspace, "prune_then_quantize", out, config, epochs=epochs)
    _kill_after_first_checkpoint(argv, out / ".work" / "prune.pt", cwd=tmp_path)
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    assert (out / ".work" / "mlflow_run_id").exists()

    assert main(argv) == 0
    resumed, uninterrupted = _metrics(out), _metrics(reference)
    assert _stable(resumed) == _stable(uninterrupted)
    assert (out / "plan.json").read_text() == (reference / "plan.json").read_text()
    assert not (out / ".work").exists()

    client = MlflowClient(digits_workspace.tracking_uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               filter_string=f"tags.mlflow.runName = '{RUN_NAME}'", run_view_type=ViewType.ALL)
    assert len(found) == 1, [run.info.run_id for run in found]
    run = found[0]
    assert run.info.run_id == resumed["mlflow_run_id"] and run.info.status == "FINISHED"
    stage = epochs // 2
    for phase in ("prune", "quantize"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, f"{phase}/train_loss"))
        assert sorted(set(steps)) == list(range(stage)), phase
    if epochs == 2:  # the finished first stage was restored, not trained again
        assert len(client.get_metric_history(run.info.run_id, "prune/train_loss")) == 1
