"""The typed benchmark configuration, validated once at workflow start.

``config/config.yaml`` (the embedded grid) and ``config/paper.yaml`` (the papers' grid) are
read into :class:`BenchConfig`. Unknown keys and out-of-range values are rejected with a
message naming the key, so a typo never silently falls back to a default. The Snakefile,
the CLI and the tests all go through :func:`load_config` / :func:`validate_config`.
"""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jpqbench.base.budget import BudgetMetric, check_budget
from jpqbench.base.errors import UserError

MethodParams = dict[str, dict[str, Any]]
"""Hyperparameters per method name, e.g. ``{"ajpq": {"episodes": 600}}``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Recipe(_Strict):
    """The training hyperparameters of one benchmark; the same for every method (the comparison contract)."""

    pretrain_epochs: int = Field(ge=1, description="epochs of FP32 pretraining")
    epochs: int = Field(ge=1, description="epochs every method gets for compression + fine-tuning")
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, description="peak learning rate of pretraining")
    finetune_lr: float = Field(gt=0, description="peak learning rate during compression")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke tests)")
    eval_every: int = Field(5, ge=1, description="validation accuracy every N epochs (and at each phase's end)")
    bn_recalibration_batches: int = Field(0, ge=0, description="after every method: re-estimate batch-norm "
                                                               "statistics on N training batches (0 = off)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="compute precision of FP32 pretraining: bf16 = "
                                                                   "autocast (weights, optimizer state and BN "
                                                                   "statistics stay FP32); compression trains in it "
                                                                   "only for a method that declares autocast support")
    channels_last: bool = Field(False, description="channels-last memory layout of conv weights and 4-D inputs in "
                                                   "pretraining (and where precision applies in compression)")


class TrainRecipe(Recipe):
    """A :class:`Recipe` bound to its model: what a pretraining or compression run is given."""

    model: str = Field(description="model zoo name (`jpqbench list models`)")


class DatasetGrid(Recipe):
    """One dataset of the grid: its models, and the recipe they share.

    ``models`` maps each model zoo name to the recipe keys that differ for that model (``{}``
    for none), so CIFAR-10's ResNet-8, ResNet-20 and VGG7 share one block and differ where
    their papers differ. A model's entry may also hold ``method_params``: method
    hyperparameters for that model only (merged over the dataset's and the grid's).

    ``method_params`` here: method hyperparameters for this dataset's runs, merged key by key
    over the grid's ``method_params`` -- a setting that depends on the input size or the
    dataset's size (a regulariser's strength, a search's reward subset) is set where it applies.
    """

    models: dict[str, dict[str, Any] | None] = Field(min_length=1)
    seeds: list[int] | None = Field(None, min_length=1, description="this dataset's seeds (default: the grid's)")
    budgets: list[float] | None = Field(None, min_length=1, description="this dataset's budgets (default: the grid's)")
    method_params: MethodParams = Field(default_factory=dict, description="method hyperparameters for this "
                                                                          "dataset, over the grid's")

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, budgets: list[float] | None) -> list[float] | None:
        for budget in budgets or []:
            check_budget(budget)
        return budgets

    @model_validator(mode="after")
    def _overrides_are_recipes(self) -> "DatasetGrid":
        for model in self.models:
            self.recipe(model)
            params = (self.models[model] or {}).get("method_params", {})
            if not isinstance(params, dict) or not all(isinstance(value, dict) for value in params.values()):
                raise ValueError(f"models.{model}.method_params: must map method names to hyperparameter "
                                 "mappings, e.g. {djpq: {kl_weight: 1.0e-5}}")
        return self

    def recipe(self, model: str) -> TrainRecipe:
        """The shared recipe with ``model``'s overrides applied."""
        shared = self.model_dump(exclude={"models", "seeds", "budgets", "method_params"})
        overrides = {key: value for key, value in (self.models[model] or {}).items() if key != "method_params"}
        try:
            return TrainRecipe(**{**shared, **overrides, "model": model})
        except ValidationError as error:
            problems = "; ".join(f"models.{model}.{'.'.join(map(str, item['loc']))}: "
                                 + ("unknown key" if item["type"] == "extra_forbidden" else item["msg"])
                                 for item in error.errors())
            raise ValueError(problems) from None


class BenchConfig(_Strict):
    """The grid: datasets x methods x budgets x seeds, plus where results go."""

    experiment: str = "jpqbench"
    tracking_uri: str | None = Field(None, description="MLflow URI; default sqlite:///<project>/mlflow.db; "
                                                       "MLFLOW_TRACKING_URI overrides both")
    data_root: str = "data"
    results_root: str = "results"
    seeds: list[int] = Field(min_length=1)
    budget_metric: BudgetMetric = "bops"
    budgets: list[float] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    datasets: dict[str, DatasetGrid] = Field(min_length=1)
    method_params: MethodParams = Field(default_factory=dict, description="method hyperparameters for every "
                                                                          "dataset (a dataset's or model's own "
                                                                          "method_params win, key by key)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where runs train and evaluate: auto = CUDA "
                                                                      "when torch sees a GPU, else the CPU; under "
                                                                      "torchrun each process uses cuda:<LOCAL_RANK>")
    loader_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="loader worker processes per training process, for datasets read from files (ImageNet); "
                            "auto = the process's CPUs (SLURM's --cpus-per-task where set) less one, at most 8. "
                            "Results do not depend on it; in-memory datasets never use workers")
    batch_runs: bool = Field(True, description="one workflow job runs every budget and seed of a (dataset, model, "
                                               "method) in turn (saves start-up); false: one job per run")

    def benchmarks(self) -> list[tuple[str, str]]:
        """Every (dataset, model) pair of the grid, in config order."""
        return [(dataset, model) for dataset, entry in self.datasets.items() for model in entry.models]

    def seeds_of(self, dataset: str) -> list[int]:
        """The seeds ``dataset`` runs with: its own ``seeds`` if given, else the grid's."""
        return self.datasets[dataset].seeds or self.seeds

    def budgets_of(self, dataset: str) -> list[float]:
        """The budgets ``dataset`` runs at: its own ``budgets`` if given, else the grid's."""
        return self.datasets[dataset].budgets or self.budgets

    def recipe(self, dataset: str, model: str | None = None) -> TrainRecipe:
        """The recipe of ``model`` on ``dataset``; ``model`` may be omitted when the dataset has one.

        Raises a :class:`UserError` naming the choices when the pair is not in the grid.
        """
        if dataset not in self.datasets:
            raise UserError(f"dataset {dataset!r} is not in the config's `datasets`",
                            f"use one of: {', '.join(self.datasets)}, or add it to the config")
        models = self.datasets[dataset].models
        if model is None:
            if len(models) > 1:
                raise UserError(f"dataset {dataset!r} has several models in the config ({', '.join(models)})",
                                "pick one with --model")
            model = next(iter(models))
        if model not in models:
            raise UserError(f"model {model!r} is not configured for dataset {dataset!r}",
                            f"use one of: {', '.join(models)}, or add it under datasets.{dataset}.models")
        return self.datasets[dataset].recipe(model)

    def method_params_of(self, dataset: str, model: str) -> MethodParams:
        """The method hyperparameters of (dataset, model): the grid's, then the dataset's, then
        the model's, merged key by key per method (the most specific wins)."""
        entry = self.datasets[dataset]
        levels = (self.method_params, entry.method_params, (entry.models[model] or {}).get("method_params", {}))
        merged: MethodParams = {}
        for level in levels:
            for method, params in level.items():
                merged[method] = {**merged.get(method, {}), **params}
        return merged

    def method_params_sources(self) -> list[tuple[str, MethodParams]]:
        """Every ``method_params`` block of the config with the key path it sits at (for error messages)."""
        sources = [("method_params", self.method_params)]
        for dataset, entry in self.datasets.items():
            sources.append((f"datasets.{dataset}.method_params", entry.method_params))
            sources += [(f"datasets.{dataset}.models.{model}.method_params", (overrides or {}).get("method_params", {}))
                        for model, overrides in entry.models.items()]
        return sources

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, budgets: list[float]) -> list[float]:
        for budget in budgets:
            check_budget(budget)
        return budgets


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {where}: {message}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "(in memory)") -> BenchConfig:
    """Validate a raw mapping (as Snakemake's ``config``) and check names against the registries."""
    from jpqbench.base.method_spec import make_method
    from jpqbench.base.registry import DATASETS, METHODS, MODELS

    try:
        config = BenchConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_format_errors(error, source),
                        "correct the keys above; the schema is jpqbench/base/config.py (BenchConfig)") from None
    # method_params may also hold a registered method that is not in `methods`: `jpqbench run
    # --method NAME` runs any registered method with this config (by hand, or a smoke-scale test)
    for where, params in config.method_params_sources():
        for method in params:
            try:
                METHODS.get(method)
            except UserError as error:
                raise UserError(f"invalid config {source}: {where}.{method}: {error.problem}", error.fix) from None
    specs = [*config.methods, *{method for _, params in config.method_params_sources() for method in params}]
    for dataset, model in config.benchmarks():
        DATASETS.get(dataset)
        MODELS.get(model)
        for spec in specs:  # a bad hyperparameter, for any benchmark: an error here
            try:
                make_method(spec, config.method_params_of(dataset, model))
            except UserError as error:
                raise UserError(f"invalid config {source}: {dataset}/{model}: {error.problem}", error.fix) from None
    return config


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a config could run something other than what its reader sees)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the base loader refuses it with its own message
                continue
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> BenchConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist", "pass an existing YAML file, e.g. config/config.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as duplicate:
        raise UserError(f"config file {path}: key {duplicate.key!r} appears twice in one mapping "
                        f"(line {duplicate.line})", "keep one of them: YAML would silently use the last") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} does not hold a mapping", "see config/config.yaml for the layout")
    return validate_config(raw, str(path))
