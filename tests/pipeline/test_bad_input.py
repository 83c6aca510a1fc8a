"""Bad input is refused with a message naming the file and the fix, never silently used (issue 10):
a corrupted or truncated dataset file, a malformed plan.json, FP32 checkpoint, training
checkpoint, work folder, metrics.json or config. (Unreadable configs, garbage checkpoints and
unknown names are covered by test_cli_errors.py.)"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import DigitsWorkspace, write_config

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS, MODELS
from jpqbench.pipeline.cli import main


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every command here uses the workspace config's MLflow store."""


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """``argv`` exits with status 2, an error and a fix line naming every ``expected`` text, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "\n  fix: " in err, err
    for text in expected:
        assert text in err, err
    return err


def _run(config: Path, checkpoint: Path, out: Path, method: str = "ptq", *extra: str) -> list[str]:
    return ["--config", str(config), "run", "--method", method, "--dataset", "digits", "--seed", "0", "--budget", "0.05",
            "--checkpoint", str(checkpoint), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ptq_run(digits_workspace: DigitsWorkspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished ptq run: its plan.json and metrics.json are the files damaged below."""
    out = tmp_path_factory.mktemp("ptq") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(_run(digits_workspace.config, digits_workspace.checkpoint, out)) == 0
    return out


# ---------------------------------------------------------------- dataset files
@pytest.mark.parametrize("damage", ["truncated", "one-bit-flipped"])
def test_corrupted_dataset_file_stops_the_run(digits_workspace: DigitsWorkspace, tmp_path: Path, capsys,
                                              damage: str) -> None:
    """digits.npz is checked against MANIFEST.json's sha256 on every load (0.1 MB)."""
    shutil.copytree(digits_workspace.data_root / "digits", tmp_path / "data" / "digits")
    npz = tmp_path / "data" / "digits" / "digits.npz"
    raw = npz.read_bytes()
    npz.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else raw[:500] + bytes([raw[500] ^ 1]) + raw[501:])
    config = write_config(tmp_path / "c.yaml", digits_workspace.root, data_root=tmp_path / "data",
                          results_root=tmp_path / "results")
    out = tmp_path / "out"
    _refused(_run(config, digits_workspace.checkpoint, out), capsys,
             f"digits data file {npz} is corrupted", "jpqbench prepare --dataset digits", "dvc pull")
    assert not out.exists()


def test_truncated_wav_is_refused(tmp_path: Path) -> None:
    """libsndfile reads a truncated wav without complaint; the reader compares its RIFF header with its size."""
    import numpy as np
    import soundfile

    reader = sys.modules[DATASETS.get("speech_commands").__module__]
    wav = tmp_path / "yes" / "0a7c2a8d_nohash_0.wav"
    wav.parent.mkdir()
    soundfile.write(wav, np.arange(16000, dtype=np.int16), 16000, subtype="PCM_16")
    assert len(reader._read_wav(wav, tmp_path)) == 16000
    wav.write_bytes(wav.read_bytes()[:20000])
    assert len(soundfile.read(wav)[0]) < 16000  # what would have been zero-padded into a quiet clip
    with pytest.raises(UserError, match="truncated: its header declares 32044 bytes, the file has 20000") as info:
        reader._read_wav(wav, tmp_path)
    assert str(wav) in info.value.problem and "jpqbench prepare --dataset speech_commands" in info.value.fix


def test_truncated_image_is_refused(tmp_path: Path) -> None:
    """Tiny ImageNet and ImageNet decode images on access: a truncated JPEG names itself."""
    from PIL import Image

    from jpqbench.harness.data import ImageFiles

    image = tmp_path / "n01443537_0.JPEG"
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()).save(image, quality=95)
    files = ImageFiles([image], torch.tensor([0]), lambda pixels: pixels.float())
    assert files[0][0].shape == (3, 64, 64)
    image.write_bytes(image.read_bytes()[:600])
    with pytest.raises(UserError, match="unreadable or truncated") as info:
        files[0]
    assert str(image) in info.value.problem and "jpqbench prepare" in info.value.fix


# ---------------------------------------------------------------- plan.json
def _cost(plan: Path) -> list[str]:
    return ["cost", "--model", "digits_cnn", "--dataset", "digits", "--plan", str(plan), "--json"]


def test_cost_of_a_run_s_plan_is_the_run_s_cost(ptq_run: Path, capsys) -> None:
    """The control for the damaged plans below: the untouched plan.json is read and counted as the run was."""
    assert main(_cost(ptq_run / "plan.json")) == 0
    figures, metrics = json.loads(capsys.readouterr().out), json.loads((ptq_run / "metrics.json").read_text())
    assert (figures["bops"], figures["weight_bits"]) == (metrics["bops"], metrics["weight_bits"])


def _first(plan: dict) -> dict:
    return next(iter(plan["layers"].values()))


PLAN_DAMAGE: dict[str, tuple[Callable[[dict], object], str]] = {
    "unknown-layer": (lambda plan: plan["layers"].__setitem__("ghost", {"out_channels": 3}), "unknown ['ghost']"),
    "missing-layer": (lambda plan: plan["layers"].pop(next(iter(plan["layers"]))), "missing ['"),
    "bits-out-of-range": (lambda plan: _first(plan).__setitem__("w_bits", 33), "bit width outside [0, 32]"),
    "bits-a-string": (lambda plan: _first(plan).__setitem__("w_bits", "8"), "w_bits='8' is not an integer"),
    "bits-fractional": (lambda plan: _first(plan).__setitem__("a_bits", 4.5), "a_bits=4.5 is not an integer"),
    "channels-of-another-model": (lambda plan: _first(plan).__setitem__("out_channels", 999),
                                  "output channel counts do not match the model"),
    "unknown-field": (lambda plan: _first(plan).__setitem__("bits", 4), "malformed"),
}


@pytest.mark.parametrize("damage", PLAN_DAMAGE)
def test_malformed_plan_is_refused(ptq_run: Path, tmp_path: Path, capsys, damage: str) -> None:
    edit, expected = PLAN_DAMAGE[damage]
    plan = json.loads((ptq_run / "plan.json").read_text())
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    _refused(_cost(path), capsys, expected)


def test_truncated_plan_is_refused(ptq_run: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "plan.json"
    path.write_text((ptq_run / "plan.json").read_text()[:200])
    _refused(_cost(path), capsys, f"plan file {path} is malformed")


# ---------------------------------------------------------------- checkpoints
def _another_model_state() -> dict[str, torch.Tensor]:
    return MODELS.get("resnet8")(10, (1, 8, 8)).state_dict()


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "is unreadable or malformed"),
    ("another-model", "does not fit model digits_cnn"),
    ("other-data", "was pretrained on other digits data"),
])
def test_malformed_fp32_checkpoint_is_refused(digits_workspace: DigitsWorkspace, tmp_path: Path, capsys,
                                              damage: str, expected: str) -> None:
    bad = tmp_path / "s0.pt"
    if damage == "truncated":
        raw = digits_workspace.checkpoint.read_bytes()
        bad.write_bytes(raw[:len(raw) // 2])
    else:
        state = torch.load(digits_workspace.checkpoint, weights_only=False)
        if damage == "another-model":
            state["state_dict"] = _another_model_state()
        else:
            state["data_hash"] = "0" * 16
        torch.save(state, bad)
    out = tmp_path / "out"
    _refused(_run(digits_workspace.config, bad, out), capsys, str(bad), expected)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "another-model"])
def test_unusable_training_checkpoint_is_refused(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                 damage: str) -> None:
    """A per-epoch checkpoint that cannot be resumed from is refused, naming it and the folder to delete."""
    from jpqbench.harness.train import TrainSpec, fit

    data = DATASETS.get("digits")().load(digits_workspace.data_root / "digits")
    checkpoint = tmp_path / "work" / "phase.pt"
    checkpoint.parent.mkdir()
    spec = TrainSpec(epochs=2, lr=0.01, batch_size=64, max_steps_per_epoch=2)
    fit(MODELS.get("digits_cnn")(10, (1, 8, 8)), data, TrainSpec(epochs=1, lr=0.01, batch_size=64,
                                                                 max_steps_per_epoch=2),
        seed=0, phase="phase", checkpoint=checkpoint)
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:
        state = torch.load(checkpoint, weights_only=False)
        state["model"] = _another_model_state()
        torch.save(state, checkpoint)
    with pytest.raises(UserError, match="cannot be resumed from") as info:
        fit(MODELS.get("digits_cnn")(10, (1, 8, 8)), data, spec, seed=0, phase="phase", checkpoint=checkpoint)
    assert str(checkpoint) in info.value.problem and str(checkpoint.parent) in info.value.fix


@pytest.mark.slow
def test_work_folder_made_for_other_inputs_is_discarded_not_resumed(digits_workspace: DigitsWorkspace,
                                                                    tmp_path: Path, capsys) -> None:
    """A killed attempt's .work made with other hyperparameters must not be resumed: it is discarded,
    its MLflow run closed as KILLED ("abandoned"), and the run starts afresh in a new MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(digits_workspace.tracking_uri)
    stale = client.create_run(client.get_experiment_by_name("t").experiment_id, run_name="stale").info.run_id
    out = tmp_path / "run"
    (out / ".work").mkdir(parents=True)
    (out / ".inputs.json").write_text('{"method": "qat", "hparams": {"calibration_batches": 1}}')
    (out / ".work" / "mlflow_run_id").write_text(stale)
    (out / ".work" / "qat.pt").write_bytes(b"a checkpoint of another run: resuming from it would fail")
    assert main(_run(digits_workspace.config, digits_workspace.checkpoint, out, "qat", "--epochs", "1")) == 0
    assert "discarding" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["mlflow_run_id"] != stale
    abandoned = client.get_run(stale)
    assert abandoned.info.status == "KILLED" and abandoned.data.tags["error"].startswith("abandoned")
    assert client.get_run(metrics["mlflow_run_id"]).info.status == "FINISHED"


# ---------------------------------------------------------------- metrics.json
METRICS_DAMAGE: dict[str, tuple[Callable[[dict], object], str]] = {
    "number-as-string": (lambda m: m.update(top1="0.9"), "top1='0.9' (not Float64)"),
    "fractional-seed": (lambda m: m.update(seed=0.5), "seed=0.5 (not Int64)"),
    "flag-as-string": (lambda m: m.update(target_met="yes"), "target_met='yes' (not boolean)"),
    "unknown-status": (lambda m: m.update(status="great"), "status='great' (not one of ok, diverged)"),
    "ok-without-accuracy": (lambda m: m.update(top1=None), "top1=None in a run whose status is ok"),
}


@pytest.mark.parametrize("damage", METRICS_DAMAGE)
def test_malformed_metrics_json_is_refused_by_aggregate(ptq_run: Path, tmp_path: Path, damage: str) -> None:
    from jpqbench.pipeline.aggregate import aggregate

    edit, expected = METRICS_DAMAGE[damage]
    metrics = json.loads((ptq_run / "metrics.json").read_text())
    edit(metrics)
    path = tmp_path / "runs" / "r" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    with pytest.raises(UserError) as info:
        aggregate(tmp_path / "runs", tmp_path / "summary.csv")
    assert str(path) in info.value.problem and expected in info.value.problem and info.value.fix
    assert not (tmp_path / "summary.csv").exists()


@pytest.mark.parametrize("text, expected", [("[1, 2]", "holds a JSON list"), ('{"top1": 0.9', "not valid JSON")],
                         ids=["not-an-object", "truncated"])
def test_metrics_json_that_is_no_record_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    from jpqbench.pipeline.aggregate import aggregate

    path = tmp_path / "runs" / "r" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        aggregate(tmp_path / "runs", tmp_path / "summary.csv")


# ---------------------------------------------------------------- config values of the wrong type
@pytest.mark.parametrize("old, new, expected", [
    ("budgets: [0.05]", "budgets: [abc]", "budgets.0: Input should be a valid number"),
    ("seeds: [0]", "seeds: zero", "seeds: Input should be a valid list"),
    (" epochs: 1, batch", " epochs: 1.5, batch", "datasets.digits.epochs: Input should be a valid integer"),
], ids=["budget", "seeds", "epochs"])
def test_config_value_of_the_wrong_type_is_named(tmp_path: Path, capsys, old: str, new: str, expected: str) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path)
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    _refused(["--config", str(config), "prepare", "--dataset", "digits"], capsys, expected)
