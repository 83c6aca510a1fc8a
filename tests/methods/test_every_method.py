"""Every registered method compresses every model of the papers' grid (config/paper.yaml) and
keeps the harness's contract there: a plan that passes verify_plan, the counted cost within the
budget (<= 1.10 x target, as the runner's ``target_met``), a model that still runs forward.

The models are the real zoo definitions at a tiny synthetic input: the Tiny ImageNet and ImageNet
models (all of which pool adaptively) at 3x32x32 -- their layer structure, residual and depthwise
couplings and shared modules are what the methods meet, not the resolution -- and the others at
their dataset's own input shape. Data are a few random batches; the randomly initialised model
first gets BN statistics that fit its activations, as a pretrained FP32 start has them (with
the initial ones, MobileNetV2's deep activations shrink to ~1e-7 in eval mode and calibrated
learned quantizers get steps of ~1e-13 whose gradients explode). Training is 1 epoch of a few
steps, with each method's search knobs turned down (its ``test_hparams``); the figures say nothing
about accuracy. Cases of the ImageNet models and of models above SLOW_MACS are marked slow.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paths import PAPER_CONFIG

from jpqbench.accounting.counter import count
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe, load_config
from jpqbench.base.method_spec import get_method
from jpqbench.base.registry import DATASETS, METHODS, MODELS
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.evaluate import recalibrate_batchnorm
from jpqbench.harness.method import RunContext

BUDGET = Budget("bops", 0.05)
BATCH, STEPS = 4, 2
TEST_SIDE = 32
# cases of models above this many MACs per sample at the test input (VGG7, the 64x64 ResNet-18 at
# 32x32) are slow, as are the ImageNet models'
SLOW_MACS = 100e6
SLOW_DATASETS = {"imagenet"}


def _grid() -> list[tuple[str, str]]:
    return load_config(PAPER_CONFIG).benchmarks()


def _slow(dataset: str, model: str) -> bool:
    plugin = DATASETS.get(dataset)
    net = MODELS.get(model)(plugin.num_classes, plugin.input_shape)
    return dataset in SLOW_DATASETS or count(net, _test_shape(plugin.input_shape)).macs > SLOW_MACS


def _marks(method: str, model: str, slow: bool) -> list:
    return [pytest.mark.slow] if slow else []


def _cases() -> list:
    return [pytest.param(method, dataset, model, id=f"{method}-{model}", marks=_marks(method, model, slow))
            for dataset, model in _grid() for slow in [_slow(dataset, model)] for method in METHODS.names()]


def _test_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dataset's input shape; images larger than CIFAR's 32x32 (Tiny ImageNet, ImageNet) at
    TEST_SIDE x TEST_SIDE -- their models pool adaptively, so they run at any size."""
    if len(shape) == 3 and min(shape[1:]) > 32:
        return (shape[0], TEST_SIDE, TEST_SIDE)
    return shape


def _context(tmp_path: Path, model: str, shape: tuple[int, ...], num_classes: int) -> RunContext:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, *shape, generator=generator),
                           torch.randint(0, num_classes, (n,), generator=generator))

    data = DataBundle("random", split(BATCH * STEPS), split(BATCH), split(BATCH), num_classes=num_classes,
                      input_shape=shape, default_model=model)
    recipe = TrainRecipe(model=model, pretrain_epochs=1, epochs=1, batch_size=BATCH, lr=0.01, finetune_lr=0.001,
                         max_steps_per_epoch=STEPS, eval_every=1)
    return RunContext(data=data, recipe=recipe, epochs=1, seed=0, work_dir=tmp_path)


def test_the_grid_is_read_from_the_papers_config() -> None:
    """The cases follow config/paper.yaml: every (dataset, model) of it, each a registered model."""
    grid = _grid()
    assert len(grid) >= 8 and len({model for _, model in grid}) == len(grid)
    assert all(MODELS.get(model) for _, model in grid)


@pytest.mark.parametrize("method, dataset, model_name", _cases())
def test_method_compresses_the_papers_model_within_budget_with_an_honest_plan(
        method: str, dataset: str, model_name: str, tmp_path: Path) -> None:
    plugin = DATASETS.get(dataset)
    torch.manual_seed(0)
    model = MODELS.get(model_name)(plugin.num_classes, plugin.input_shape)
    shape = _test_shape(plugin.input_shape)
    ctx = _context(tmp_path, model_name, shape, plugin.num_classes)
    with torch.no_grad():  # BN statistics that fit the activations, as a pretrained FP32 start has them
        recalibrate_batchnorm(model, ctx.calibration_batches(STEPS))
    instance = get_method(method)(**get_method(method).test_hparams)
    budget = BUDGET if instance.takes_budget else None
    compressed = instance.compress(model, budget, ctx)
    batch = next(iter(ctx.calibration_batches(1)))
    verify_plan(compressed.plan, compressed.model, batch)
    if budget is not None:
        achieved = ctx.cost(compressed.model, compressed.plan).relative(budget.metric)
        assert achieved <= budget.target * 1.10, f"{method} on {model_name}: {achieved:.4f} of FP32"
    compressed.model.eval()
    with torch.no_grad():
        out = compressed.model(batch)
    assert out.shape == (BATCH, plugin.num_classes) and torch.isfinite(out).all()
