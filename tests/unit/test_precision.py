"""Precision and layout options of the recipe: ``precision: bf16`` (autocast) and ``channels_last``.

They are for FP32 pretraining on GPUs; compression trains in them only for a method that declares
``autocast`` (a fake quantizer's grid must see FP32 values). bf16 autocast also runs on the CPU,
so what it does is tested here: the forward pass computes in bf16 while weights, optimizer state
and BN statistics stay FP32, and the defaults leave training bit for bit as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DigitsWorkspace, write_config
from torch import nn

from jpqbench.base.config import TrainRecipe, load_config
from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS, MODELS
from jpqbench.harness.method import RunContext
from jpqbench.harness.train import TrainSpec, fit
from jpqbench.pipeline.cli import main

SPEC = dict(epochs=1, lr=0.05, batch_size=32, max_steps_per_epoch=3, eval_every=1)


@pytest.fixture(autouse=True)
def _config_store(no_env_tracking_uri) -> None:
    """Every run here logs to the workspace's MLflow store."""


@pytest.fixture(scope="module")
def digits(digits_workspace: DigitsWorkspace):
    return DATASETS.get("digits")().load(digits_workspace.data_root / "digits")


def _model(data) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.get("digits_cnn")(data.num_classes, data.input_shape)


def _trained(data, **options) -> tuple[nn.Module, list[torch.dtype]]:
    """A model trained 3 steps with ``options``, and the dtypes its convs computed in while training."""
    model = _model(data)
    seen: list[torch.dtype] = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype) if module.training else None)
    fit(model, data, TrainSpec(**SPEC, **options), seed=0, phase="t")
    return model, seen


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_autocasts_the_forward_and_keeps_every_state_in_fp32(digits) -> None:
    fp32, fp32_dtypes = _trained(digits)
    bf16, bf16_dtypes = _trained(digits, precision="bf16")
    assert set(fp32_dtypes) == {torch.float32} and set(bf16_dtypes) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in bf16.state_dict().values() if t.is_floating_point())
    assert not _equal(fp32, bf16)  # the forward really computed in bf16
    for name, tensor in bf16.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    assert _equal(fp32, _trained(digits, precision="fp32", channels_last=False)[0])  # the defaults: unchanged


def test_channels_last_stores_conv_weights_channels_last_and_trains_alike(digits) -> None:
    dense, _ = _trained(digits)
    last, _ = _trained(digits, channels_last=True)
    convs = [m for m in last.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    for (name, a), b in zip(dense.state_dict().items(), last.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), name  # the same arithmetic in another summation order


@pytest.mark.parametrize("declared", [False, True])
def test_compression_trains_in_the_recipe_precision_only_when_the_method_declares_autocast(digits, tmp_path: Path,
                                                                                             declared: bool) -> None:
    def trained(precision: str) -> nn.Module:
        recipe = TrainRecipe(model="digits_cnn", pretrain_epochs=1, epochs=1, batch_size=32, lr=0.05,
                             finetune_lr=0.01, max_steps_per_epoch=3, precision=precision)
        ctx = RunContext(data=digits, recipe=recipe, epochs=1, seed=0, work_dir=tmp_path / precision,
                         autocast=declared)
        model = _model(digits)
        ctx.train(model, 1, phase="finetune")
        assert ctx.train_precision == (precision if declared else "fp32")
        return model

    assert _equal(trained("fp32"), trained("bf16")) != declared


def test_a_run_records_the_precision_it_trained_in(digits_workspace: DigitsWorkspace, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bf16.yaml", digits_workspace.root, data_root=digits_workspace.data_root,
                          results_root=tmp_path / "results")
    config.write_text(config.read_text().replace("max_steps_per_epoch: 3}", "max_steps_per_epoch: 3, precision: bf16}"))
    for method, expected in (("prune", "bf16"), ("qat", "fp32")):
        out = tmp_path / method
        argv = ["--config", str(config), "run", "--method", method, "--dataset", "digits", "--seed", "0",
                "--checkpoint", str(digits_workspace.checkpoint), "--budget", "0.05", "--out", str(out)]
        assert main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["train_precision"] == expected and metrics["status"] == "ok"
        assert json.loads((out / ".inputs.json").read_text())["recipe"]["precision"] == "bf16"


def test_an_unknown_precision_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path)
    config.write_text(config.read_text().replace("max_steps_per_epoch: 3}", "max_steps_per_epoch: 3, precision: fp16}"))
    with pytest.raises(UserError, match=r"datasets\.digits\.precision"):
        load_config(config)
