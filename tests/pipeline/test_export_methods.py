"""Every method's real plan exports: the artifact written by `jpqbench run` loads back into a model that
computes what the masked fake-quantized model computes, with the size accounted to the bit; and
`jpqbench export --run-dir` re-exports a finished run to the same file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DigitsWorkspace

from jpqbench.export.artifact import load, read
from jpqbench.pipeline.cli import main

pytestmark = pytest.mark.slow

# one method per quantizer family: uniform (ptq), float pruning (prune), per-channel widths with
# 0-bit channels (cwmpq), learned steps with VIB gates (djpq), learned steps with QASSO groups
# (geta), power-of-two operators with activation masks before the ReLUs (noncomm)
METHODS = ["ptq", "prune", "cwmpq", "djpq", "geta", "noncomm"]


@pytest.fixture(scope="module")
def runs(digits_workspace: DigitsWorkspace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for method in METHODS:
            argv = ["--config", str(digits_workspace.config), "run", "--method", method, "--dataset", "digits",
                    "--seed", "0", "--epochs", "2", "--checkpoint", str(digits_workspace.checkpoint),
                    "--out", str(root / method), "--budget", "0.05"]
            assert main(argv) == 0, method
    return {method: root / method for method in METHODS}


def _batch(digits_workspace: DigitsWorkspace) -> torch.Tensor:
    from jpqbench.base.registry import DATASETS

    data = DATASETS.get("digits")().load(digits_workspace.data_root / "digits")
    return next(iter(data.loader("train", 128)))[0]


@pytest.mark.parametrize("method", METHODS)
def test_exported_model_equals_the_fake_quantized_model(runs: dict[str, Path], digits_workspace: DigitsWorkspace,
                                                        method: str) -> None:
    out = runs[method]
    metrics = json.loads((out / "metrics.json").read_text())
    fake = torch.load(out / "model.pt", weights_only=False)["model"].eval()
    exported = load(out / "model.jpq")
    batch = _batch(digits_workspace)
    with torch.no_grad():
        expected, got = fake(batch), exported(batch)
    # float32 rounding of the folded BN may move a rare activation across a quantizer threshold
    assert torch.allclose(got, expected, atol=1e-2 * float(expected.abs().max()))
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.98
    assert metrics["artifact_size_ok"] is True  # file = counted weight bits + computed overhead, to the bit
    assert metrics["artifact_bytes"] == (out / "model.jpq").stat().st_size
    assert metrics["artifact_counted_bytes"] == metrics["weight_bits"] / 8
    assert metrics["export_weight_max_error"] == 0.0  # every weight read back bit for bit
    assert abs(metrics["export_top1_delta_pp"]) <= 0.1 and metrics["export_flagged"] is False
    assert metrics["latency_threads"] >= 1 and metrics["latency_pruned_b1_ms"] > 0


def test_pruned_channels_are_removed_physically(runs: dict[str, Path]) -> None:
    plan = json.loads((runs["prune"] / "plan.json").read_text())
    artifact = read(runs["prune"] / "model.jpq")
    shapes = {layer.name: layer.shape for layer in artifact.layers}
    for name, layer in plan["layers"].items():
        assert shapes[name][0] == layer["out_channels"] - len(layer["pruned"]), name


def test_reexport_of_a_finished_run_writes_the_same_artifact(runs: dict[str, Path], digits_workspace: DigitsWorkspace,
                                                             no_env_tracking_uri) -> None:
    out = runs["cwmpq"]
    before = (out / "model.jpq").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["--config", str(digits_workspace.config), "export", "--run-dir", str(out)]) == 0
    assert (out / "model.jpq").read_bytes() == before
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in metrics if not k.startswith("latency_") and not k.endswith("_time_s")} == \
        {k: metrics[k] for k in metrics if not k.startswith("latency_") and not k.endswith("_time_s")}


def test_export_of_a_folder_that_is_not_a_run_is_a_user_error(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                              capsys) -> None:
    assert main(["--config", str(digits_workspace.config), "export", "--run-dir", str(tmp_path)]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_inputs_dead_under_an_activation_mask_are_overhead_not_counted(runs: dict[str, Path],
                                                                      digits_workspace: DigitsWorkspace) -> None:
    """A channel that noncomm's mask zeroes for every input is dead for the counter; the artifact
    still stores its weights (the channel is not structurally pruned), as overhead, so the file
    stays counted + overhead to the bit (a minispeech run of the default grid found the gap)."""
    from jpqbench.accounting.counter import count
    from jpqbench.accounting.plan import CompressionPlan
    from jpqbench.blocks.noncomm.qsparse import PreActivationReLU
    from jpqbench.export.build import build_artifact

    state = torch.load(runs["noncomm"] / "model.pt", weights_only=False)
    model, plan = state["model"].eval(), CompressionPlan.from_dict(state["plan"])
    operator = next(m.pre for m in model.modules() if isinstance(m, PreActivationReLU) and m.pre.prunable)
    operator.mask[0] = 0  # one whole channel masked for every input
    batch = _batch(digits_workspace)
    built = build_artifact(model, plan, "digits_cnn", 10, tuple(batch.shape[1:]), batch)
    assert built.size.dead_inputs > 0
    assert built.size.counted == count(model, tuple(batch.shape[1:]), plan).weight_bits
