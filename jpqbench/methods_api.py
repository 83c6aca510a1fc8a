"""What a method plugin sees: :class:`Method`, :class:`Budget`, :class:`RunContext`, :class:`Compressed`.

A method is one file in ``methods/``::

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
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from jpqbench.config import BudgetMetric, TrainRecipe, check_budget
from jpqbench.cost import CostReport, count
from jpqbench.data import DataBundle
from jpqbench.errors import UserError
from jpqbench.plan import CompressionPlan
from jpqbench.registry import METHODS
from jpqbench.train import TrainHooks, TrainResult, TrainSpec, fit


@dataclass(frozen=True)
class Budget:
    """A cost target as a fraction of the FP32 model's cost (``metric`` = "bops" or "size")."""

    metric: BudgetMetric
    target: float

    def __post_init__(self) -> None:
        if self.metric not in ("bops", "size"):
            raise UserError(f"unknown budget metric {self.metric!r}", "use --budget-metric bops or size")
        try:
            check_budget(self.target)
        except ValueError as error:
            raise UserError(str(error), "pass --budget as a fraction, e.g. --budget 0.05") from None

    @property
    def key(self) -> str:
        """The run-directory name of this budget, e.g. ``bops-0.05``."""
        return f"{self.metric}-{self.target:g}"


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


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value,...]`` -> (name, hyperparameter overrides).

    A variant lets one grid compare settings of one method side by side, e.g.
    ``noncomm[order=pq,acts=true]``; values are read as YAML scalars (``true``, ``0.5``, ``pq``).
    """
    name, bracket, rest = spec.partition("[")
    if not bracket:
        return spec, {}
    if not rest.endswith("]") or not name:
        raise UserError(f"method {spec!r} is not of the form name[key=value,...]",
                        "write e.g. noncomm[order=pq,acts=true]")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest[:-1].split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UserError(f"method {spec!r}: {item!r} is not key=value", "write e.g. noncomm[order=pq,acts=true]")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return name, overrides


def get_method(spec: str) -> type[Method]:
    """The plugin class of a method name or variant spec."""
    return METHODS.get(parse_method_spec(spec)[0])


def make_method(spec: str, method_params: dict[str, dict[str, Any]] | None = None) -> Method:
    """Instantiate ``spec`` with the config's ``method_params[name]``, then the variant's overrides."""
    name, overrides = parse_method_spec(spec)
    return get_method(name)(**{**(method_params or {}).get(name, {}), **overrides})


def method_takes_budget(spec: str) -> bool:
    """Whether the grid runs ``spec`` at every budget (False: once per seed, as a reference)."""
    return get_method(spec).takes_budget
