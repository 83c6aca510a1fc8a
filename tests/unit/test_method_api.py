"""The RunContext contract: every method gets the same epoch budget, and time spent outside
it is accounted as search cost."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.method import RunContext
from jpqbench.models.zoo import digits_cnn


def _context(tmp_path: Path, epochs: int = 2) -> RunContext:
    generator = torch.Generator().manual_seed(0)

    def split() -> TensorSplit:
        return TensorSplit(torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator))

    data = DataBundle("random", split(), split(), split(), num_classes=10, input_shape=(1, 8, 8),
                      default_model="digits_cnn")
    recipe = TrainRecipe(model="digits_cnn", pretrain_epochs=1, epochs=epochs, batch_size=16, lr=0.1, finetune_lr=0.01)
    return RunContext(data=data, recipe=recipe, epochs=epochs, seed=0, work_dir=tmp_path)


def test_train_refuses_epochs_beyond_the_run_budget(tmp_path: Path) -> None:
    ctx = _context(tmp_path, epochs=2)
    model = digits_cnn(10, (1, 8, 8))
    ctx.train(model, 1, phase="first")
    ctx.train(model, 1, phase="second")
    assert ctx.epochs_used == 2
    with pytest.raises(RuntimeError, match="only 0 of the run's 2 are left"):
        ctx.train(model, 1, phase="third")


def test_search_timer_accumulates_time_outside_training(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    with ctx.search_timer():
        time.sleep(0.05)
    with ctx.search_timer():
        time.sleep(0.05)
    assert 0.1 <= ctx.search_s < 1.0
    assert ctx.epochs_used == 0


def test_calibration_batches_come_from_the_training_split(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    for batch in ctx.calibration_batches(2):
        for row in batch:
            assert any(torch.equal(row, candidate) for candidate in ctx.data.train.inputs)
            assert not any(torch.equal(row, candidate) for candidate in ctx.data.test.inputs)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_budget_outside_zero_one_is_a_user_error(target: float) -> None:
    with pytest.raises(UserError, match="out of range"):
        Budget("bops", target)


def test_budget_key_names_the_run_folder() -> None:
    assert Budget("size", 0.05).key == "size-0.05"
