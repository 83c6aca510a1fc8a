"""What a method plugin sees: :class:`Method`, :class:`RunContext`, :class:`Compressed` (and the
:class:`~jpqbench.base.budget.Budget` it is given).

A method is one file in ``jpqbench/methods/``::

    @register_method("mymethod")
    class MyMethod(Method):
        '''What it is, the paper, and every choice the paper leaves open.'''

        class Hparams(Method.Hparams):
            bits: int = 4

        def compress(self, model, budget, ctx):
            ...                                   # mask / quantize / train through ctx
            return Compressed(model, plan_from_model(model, self.name))

The harness owns everything that is the same for all methods: the data, the FP32 start,
the training loop (``ctx.train``), the epoch budget, the cost counter (``ctx.cost``),
checking the plan, evaluation and logging. ``ctx.train`` refuses to spend more epochs than
the run's budget, so every method gets the same training recipe; work outside it (an RL
search) is timed with ``ctx.search_timer()`` and reported as search cost.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from jpqbench.accounting.counter import CostReport, count
from jpqbench.accounting.plan import CompressionPlan
from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.base.registry import METHODS
from jpqbench.harness.data import DataBundle
from jpqbench.harness.train import TrainHooks, TrainResult, TrainSpec, fit


@dataclass
class Compressed:
    """A method's result: the compressed model and its plan.

    ``searched``: for a method whose search ends in a projection onto the budget (a greedy
    fit, a budget wall applied after the search), the plan the search itself reached, before
    any projection. The harness counts it with the same counter as ``plan`` and reports it as
    ``searched_relative_bops`` / ``searched_relative_size``, so a reader sees how much of the
    result the projection, not the search, decided. ``None`` for methods that do not project.
    """

    model: nn.Module
    plan: CompressionPlan
    searched: CompressionPlan | None = None


@dataclass
class RunContext:
    """Everything a method may use; built by the harness for one run."""

    data: DataBundle
    recipe: TrainRecipe
    epochs: int
    seed: int
    work_dir: Path
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    autocast: bool = False  # the method declares it may train under the recipe's precision (Method.autocast)
    epochs_used: int = 0
    search_s: float = 0.0
    train_results: list[TrainResult] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape

    @property
    def train_precision(self) -> str:
        """What :meth:`train` computes in: the recipe's ``precision`` for a method that declared
        autocast support, else FP32 (fake quantizers must see FP32 values)."""
        return self.recipe.precision if self.autocast else "fp32"

    def cost(self, model: nn.Module, plan: CompressionPlan | None = None) -> CostReport:
        """The harness's one cost counter (the same that reports the run)."""
        return count(model, self.input_shape, plan)

    def train(self, model: nn.Module, epochs: int, phase: str, hooks: TrainHooks | None = None,
              lr: float | None = None) -> TrainResult:
        """Train for ``epochs`` epochs of the run's budget, with checkpoints under ``work_dir``.

        ``phase`` names the stage (it keys the checkpoint and the logged metrics); a phase that
        already finished in an earlier, interrupted invocation is restored, not retrained.
        """
        if epochs <= 0:
            return TrainResult()
        if self.epochs_used + epochs > self.epochs:
            raise RuntimeError(f"phase {phase!r} asks for {epochs} epochs but only "
                               f"{self.epochs - self.epochs_used} of the run's {self.epochs} are left")
        self.epochs_used += epochs
        spec = TrainSpec(epochs=epochs, lr=lr or self.recipe.finetune_lr, batch_size=self.recipe.batch_size,
                         optimizer=self.recipe.optimizer, momentum=self.recipe.momentum,
                         weight_decay=self.recipe.weight_decay, max_steps_per_epoch=self.recipe.max_steps_per_epoch,
                         eval_every=self.recipe.eval_every, precision=self.train_precision,
                         channels_last=self.recipe.channels_last and self.autocast)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        result = fit(model, self.data, spec, seed=self.seed, phase=phase,
                     checkpoint=self.work_dir / f"{phase}.pt", hooks=hooks, log=self.log_metrics)
        self.train_results.append(result)
        return result

    def calibration_batches(self, n_batches: int = 8) -> Iterator[torch.Tensor]:
        """Deterministic batches of *training* inputs for calibration (never the test split)."""
        loader = self.data.loader("train", self.recipe.batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(self.seed))
        for index, (inputs, _) in enumerate(loader):
            if index >= n_batches:
                break
            yield inputs

    @contextmanager
    def search_timer(self) -> Iterator[None]:
        """Time spent outside the training budget (an RL search), reported as search cost."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.data.device.type == "cuda":  # the search's queued GPU work is part of its time
                torch.cuda.synchronize(self.data.device)
            self.search_s += time.perf_counter() - start


class Method:
    """Base class of a compression method plugin."""

    name: ClassVar[str] = ""
    takes_budget: ClassVar[bool] = True  # False for references such as fp32
    # False when the method cannot train data-parallel under torchrun (a global search or
    # projection that DDP's averaged gradients would not reproduce); such a launch is refused
    distributed: ClassVar[bool] = True
    # True when the method trains correctly under bf16 autocast (no fake quantizer, whose grid
    # must see FP32 values): then ctx.train uses the recipe's precision and layout, else FP32
    autocast: ClassVar[bool] = False
    # False for a method that never trains (the FP32 reference, post-training quantization): its
    # context grants no epochs, so it cannot train by accident, and `jpqbench estimate` counts none
    trains: ClassVar[bool] = True
    # hyperparameters that turn the method's own searches down to a few steps (benchopt's
    # test_parameters): the test suite runs every registered method with them on every model of
    # the papers' grid, so a new method needs no test edit
    test_hparams: ClassVar[dict[str, Any]] = {}

    class Hparams(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **hparams: Any) -> None:
        try:
            self.hp = self.Hparams(**hparams)
        except ValidationError as error:
            raise UserError(f"invalid hyperparameters for method {self.name!r}: {error}",
                            f"see the Hparams of {METHODS.file_of(self.name)}") from None

    def compress(self, model: nn.Module, budget: Budget | None, ctx: RunContext) -> Compressed:
        raise NotImplementedError

    @classmethod
    def search_images(cls, hparams: Hparams, train_samples: int, val_samples: int) -> tuple[int, int]:
        """The samples that a run's work outside the training budget reads, as (trained, forward-only).

        ``jpqbench estimate`` adds them to the run's epochs when it projects device time, so a
        method whose search reads data (an RL reward) overrides this; the default, (0, 0), is
        right for a method whose work is all in ``ctx.train``. ``train_samples`` and
        ``val_samples`` are the dataset's split sizes, which cap any subset drawn from them.
        """
        return 0, 0
