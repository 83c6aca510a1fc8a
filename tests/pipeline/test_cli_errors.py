"""User mistakes at the command line: exit status 2, an ``error:`` and a ``fix:`` line, and no
metrics.json left behind for Snakemake to take as a finished run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DigitsWorkspace, create_experiment, write_config

from jpqbench.pipeline.cli import main


def _run(config: Path, out: Path, *extra: str, method: str = "ptq", checkpoint: Path | None = None) -> list[str]:
    args = ["--config", str(config), "run", "--method", method, "--dataset", "digits", "--seed", "0",
            "--out", str(out), *extra]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    return args


def _assert_user_error(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path | None, *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    problem = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    fixes = [line.strip() for line in lines[problem + 1:] if line.strip().startswith("fix: ")]
    assert fixes and len(fixes[0]) > len("fix: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    if out is not None:
        assert not list(out.rglob("metrics.json")) if out.exists() else True
    return err


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every command here uses the tmp config's MLflow store."""


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_unknown_method(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    err = _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", method="magic",
                                  checkpoint=digits_workspace.checkpoint), capsys, out, "unknown method 'magic'")
    assert "prune_then_quantize" in err  # the fix lists the known methods


@pytest.mark.parametrize("budget", ["0", "1.2", "1", "-0.5"])
def test_budget_out_of_range(digits_workspace: DigitsWorkspace, out: Path, capsys, budget: str) -> None:
    _assert_user_error(_run(digits_workspace.config, out, "--budget", budget, checkpoint=digits_workspace.checkpoint),
                       capsys, out, f"budget {float(budget)} is out of range", "--budget")


def test_missing_dataset_files(digits_workspace: DigitsWorkspace, tmp_path: Path, out: Path, capsys) -> None:
    empty = tmp_path / "empty_data"
    empty.mkdir()
    config = write_config(tmp_path / "c.yaml", tmp_path, data_root=empty)
    _assert_user_error(_run(config, out, "--budget", "0.05", checkpoint=digits_workspace.checkpoint), capsys, out,
                       "is missing", "jpqbench prepare --dataset digits")
    # the implicit pretraining of a missing checkpoint stops on the same error, before any training
    _assert_user_error(_run(config, out, "--budget", "0.05"), capsys, out, "is missing")
    assert not list((tmp_path / "results").rglob("*.pt")) if (tmp_path / "results").exists() else True
    _assert_user_error(["--config", str(config), "pretrain", "--dataset", "digits"], capsys, None, "is missing")


def test_malformed_yaml(tmp_path: Path, out: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("experiment: t\nseeds: [0\nmethods: {ptq\n")
    _assert_user_error(_run(config, out, "--budget", "0.05"), capsys, out, "is not valid YAML")


def test_config_not_a_mapping(tmp_path: Path, out: Path, capsys) -> None:
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    _assert_user_error(_run(config, out, "--budget", "0.05"), capsys, out, "does not hold a mapping")


def test_missing_config_file(tmp_path: Path, out: Path, capsys) -> None:
    _assert_user_error(_run(tmp_path / "nope.yaml", out, "--budget", "0.05"), capsys, out, "does not exist")


def test_unknown_config_key(tmp_path: Path, out: Path, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path, extra="learning_rate: 0.1\n")
    _assert_user_error(_run(config, out, "--budget", "0.05"), capsys, out, "learning_rate: unknown key")


def test_fp32_given_a_budget(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", method="fp32",
                            checkpoint=digits_workspace.checkpoint), capsys, out, "takes no budget", "omit --budget")


def test_compression_method_without_budget(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    _assert_user_error(_run(digits_workspace.config, out, checkpoint=digits_workspace.checkpoint), capsys, out,
                       "needs a budget")


def test_dataset_not_in_config(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    argv = _run(digits_workspace.config, out, "--budget", "0.05")
    argv[argv.index("digits")] = "cifar10"
    _assert_user_error(argv, capsys, out, "'cifar10' is not in")


def test_zero_epochs(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", "--epochs", "0",
                            checkpoint=digits_workspace.checkpoint), capsys, out, "--epochs must be at least 1")


def test_corrupt_checkpoint(digits_workspace: DigitsWorkspace, tmp_path: Path, out: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", checkpoint=bad), capsys, out,
                       "unreadable or malformed")
    _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", checkpoint=tmp_path / "absent.pt"),
                       capsys, out, "does not exist")


def test_rejected_run_creates_no_run_folder(digits_workspace: DigitsWorkspace, out: Path, capsys) -> None:
    _assert_user_error(_run(digits_workspace.config, out, "--budget", "0.05", method="magic",
                            checkpoint=digits_workspace.checkpoint), capsys, out, "unknown method")
    assert not out.exists()  # nothing was started


def test_cost_needs_a_shape_and_rejects_a_foreign_plan(tmp_path: Path, capsys) -> None:
    code = main(["cost", "--model", "resnet8"])
    assert code == 2 and "fix:" in capsys.readouterr().err
    from jpqbench.accounting.plan import CompressionPlan, LayerPlan

    plan = tmp_path / "plan.json"
    CompressionPlan({"not_a_layer": LayerPlan(out_channels=3)}).save(plan)
    _assert_user_error(["cost", "--model", "resnet8", "--input-shape", "3", "32", "32", "--plan", str(plan)],
                       capsys, None, "plan does not fit model resnet8")
    _assert_user_error(["cost", "--model", "resnet8", "--input-shape", "3", "32", "32", "--plan", str(plan),
                        "--w-bits", "4"], capsys, None, "exclusive")


def test_invalid_run_fails_before_any_work(digits_workspace: DigitsWorkspace, tmp_path: Path, out: Path,
                                           capsys) -> None:
    results = tmp_path / "fresh_results"  # no checkpoint here yet
    config = write_config(tmp_path / "c.yaml", tmp_path, data_root=digits_workspace.data_root, results_root=results)
    create_experiment(tmp_path, "t")
    _assert_user_error(_run(config, out, "--budget", "0.05", method="magic"), capsys, out, "unknown method")
    assert not list(results.rglob("*.pt")), "a checkpoint was pretrained for a run that could never start"


def test_several_models_need_model_named(digits_workspace: DigitsWorkspace, tmp_path: Path, out: Path,
                                         capsys) -> None:
    config = write_config(tmp_path / "two_models.yaml", digits_workspace.root,
                          data_root=digits_workspace.data_root, results_root=tmp_path / "results")
    config.write_text(config.read_text().replace("models: {digits_cnn: {}}", "models: {digits_cnn: {}, resnet8: {}}"))
    _assert_user_error(_run(config, out, "--budget", "0.05"), capsys, out,
                       "dataset 'digits' has several models in the config (digits_cnn, resnet8)", "--model")
    _assert_user_error(_run(config, out, "--budget", "0.05", "--model", "vgg7"), capsys, out,
                       "model 'vgg7' is not configured for dataset 'digits'")


def test_method_variant_runs_under_its_own_folder(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                  capsys) -> None:
    """A variant's hyperparameters reach the method; its default run folder is named by the variant."""
    config = write_config(tmp_path / "variant.yaml", digits_workspace.root, data_root=digits_workspace.data_root,
                          results_root=digits_workspace.results_root)
    config.write_text(config.read_text().replace("methods: [fp32, ptq]", "methods: [fp32, 'ptq[calibration_batches=1]']"))
    argv = ["--config", str(config), "run", "--method", "ptq[calibration_batches=1]", "--dataset", "digits",
            "--budget", "0.05", "--seed", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    run_dir = (digits_workspace.results_root / "runs" / "digits" / "digits_cnn" / "ptq[calibration_batches=1]"
               / "bops-0.05" / "s0")
    from mlflow.tracking import MlflowClient

    metrics = json.loads((run_dir / "metrics.json").read_text())
    params = MlflowClient(digits_workspace.tracking_uri).get_run(metrics["mlflow_run_id"]).data.params
    assert params["hp.calibration_batches"] == "1" and metrics["method"] == "ptq[calibration_batches=1]"


def test_checkpoints_must_pair_with_seeds(digits_workspace: DigitsWorkspace, tmp_path: Path, capsys) -> None:
    """Each seed of a batched run starts from its own checkpoint: counts must match, seeds be distinct."""
    base = ["--config", str(digits_workspace.config), "run", "--method", "ptq", "--dataset", "digits",
            "--budget", "0.05"]
    checkpoint = str(digits_workspace.checkpoint)
    _assert_user_error(base + ["--seed", "0", "--seed", "1", "--checkpoint", checkpoint], capsys, None,
                       "1 --checkpoint for 2 --seed", "one --checkpoint per --seed")
    _assert_user_error(base + ["--seed", "1", "--seed", "1"], capsys, None, "--seed lists a seed twice")
    _assert_user_error(base + ["--seed", "0", "--seed", "1", "--out", str(tmp_path / "o")], capsys, tmp_path / "o",
                       "--out names one run folder")
