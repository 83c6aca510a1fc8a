"""``jpqbench estimate``: what a config's grid will cost, before any of it runs.

Why: a config fixes the grid (datasets x models x methods x budgets x seeds) and every run's
epochs, but what that costs -- device-hours, and the runtime each SLURM job must ask for --
used to show only once the grid had run. This module counts, per (dataset, model, method),
the Snakemake jobs and the runs of the grid (:func:`jpqbench.pipeline.grid.grid`, the Snakefile's own
definition; one FP32 pretraining per (dataset, model, seed)), each run's training epochs and
the samples it processes ("images", whatever the modality), and, given a measured training
throughput per (dataset, model), projects device-hours and each rule's longest job.

What one run counts:

* training: ``epochs x min(train split, max_steps_per_epoch x batch_size)``, with
  ``pretrain_epochs`` for a pretraining and ``epochs`` for a compression run -- the budget that
  ``ctx.train`` lets no method exceed (an upper bound for a method that stops early), none for
  a method that never trains (``Method.trains`` false: ptq, the fp32 reference);
* evaluation, forward only: a val pass every ``eval_every`` epochs and at the end (counted as
  one training phase: a method training in several phases evaluates at each phase's end too);
  a compression run adds the runner's final val pass, its three test passes (accuracy,
  measured activation sparsity, the exported artifact's accuracy) and the recipe's
  ``bn_recalibration_batches``;
* search: what a method reads outside the training budget, trained and forward only
  (:meth:`jpqbench.harness.method.Method.search_images`; ajpq's RL rewards).

Time = (trained samples + forward-only samples x :data:`EVAL_WEIGHT`) / throughput: a forward
pass costs about a third of a training step, whose backward pass costs about two forwards.

What it does not do: measure anything (throughput comes from ``benchmarks/throughput.py`` on
the user's device, or from ``--img-per-s``); guess a missing throughput (that row is unknown,
"—", and the totals say how many rows are); count process start-up, data preparation and
loading, checkpoint writing, a method's calibration batches or the queue; tell pretraining in
bf16 from compression in FP32 (one throughput per (dataset, model)); or see that the exported
artifact's test pass runs on the CPU, where it is slower than counted.

The throughput file, as ``benchmarks/throughput.py`` writes it::

    {"device": "NVIDIA H100 80GB HBM3", "img_per_s": {"cifar10/resnet20": 21500.0, ...}}

``img_per_s``: training samples per second of each ``<dataset>/<model>`` at its recipe's batch
size; ``device``: what it was measured on (shown, not checked). Entries for (dataset, model)
pairs that the config does not run are ignored; unregistered names are refused.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from jpqbench.base.config import BenchConfig, TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS, MODELS

if TYPE_CHECKING:
    from jpqbench.harness.method import Method

EVAL_WEIGHT = 1 / 3  # cost of a forward-only sample, in training samples (forward + backward ~ 3 forwards)
SAFETY_FACTOR = 1.5  # a suggested SLURM runtime: the longest job x this, for what the count leaves out
FINAL_VAL_PASSES = 1  # jpqbench.pipeline.runner.run: the compressed model's val accuracy
FINAL_TEST_PASSES = 3  # jpqbench.pipeline.runner.run: top-1/top-5, measured activation sparsity, the artifact's top-1
PRETRAIN = "pretrain"  # the method column and the Snakemake rule of a (dataset, model)'s pretraining
THROUGHPUT_FORMAT = '{"device": "...", "img_per_s": {"<dataset>/<model>": N, ...}}'


@dataclass(frozen=True)
class Work:
    """Epochs and samples: of one run, or summed over runs."""

    epochs: int
    train_images: int
    eval_images: int  # forward only
    search_train_images: int = 0
    search_eval_images: int = 0  # forward only

    def times(self, runs: int) -> Work:
        """The work of ``runs`` such runs."""
        return Work(*(runs * value for value in astuple(self)))

    @property
    def search_images(self) -> int:
        return self.search_train_images + self.search_eval_images

    @property
    def train_equivalent(self) -> float:
        """Samples in units of one training sample (forward-only ones weigh :data:`EVAL_WEIGHT`)."""
        return self.train_images + self.search_train_images + EVAL_WEIGHT * (self.eval_images + self.search_eval_images)


@dataclass(frozen=True)
class Row:
    """One (dataset, model, method) of the grid, or a (dataset, model)'s pretraining (method ``pretrain``)."""

    dataset: str
    model: str
    method: str
    rule: str  # the Snakemake rule its jobs run in
    runs: int
    jobs: int
    run: Work  # of each of its runs: every budget and seed does the same work
    img_per_s: float | None  # the (dataset, model)'s training throughput; None: unknown

    @property
    def benchmark(self) -> str:
        return f"{self.dataset}/{self.model}"

    @property
    def total(self) -> Work:
        return self.run.times(self.runs)

    def hours(self, runs: int) -> float | None:
        """Device-hours of ``runs`` of its runs; None without a throughput."""
        return None if self.img_per_s is None else runs * self.run.train_equivalent / self.img_per_s / 3600

    @property
    def job_hours(self) -> float | None:
        """Device-hours of one of its jobs (a job runs every budget and seed in a batched grid)."""
        return self.hours(self.runs // self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "model": self.model, "method": self.method, "rule": self.rule,
                "runs": self.runs, "jobs": self.jobs, "epochs_per_run": self.run.epochs, **vars(self.total),
                "img_per_s": self.img_per_s, "device_hours": self.hours(self.runs), "job_hours": self.job_hours}


def split_samples(dataset: str) -> dict[str, int]:
    """The train/val/test sizes that ``dataset``'s plugin declares, known without its data."""
    plugin = DATASETS.get(dataset)
    sizes = getattr(plugin, "split_samples", None)
    if not isinstance(sizes, dict) or set(sizes) != {"train", "val", "test"}:
        raise UserError(f"dataset plugin {dataset!r} ({plugin.__module__}) declares no split_samples, the split "
                        "sizes `jpqbench estimate` counts with",
                        'add a class attribute split_samples = {"train": N, "val": N, "test": N}, counted from its '
                        "split rules (as jpqbench/datasets/cifar10.py does)")
    return sizes


def epoch_images(recipe: TrainRecipe, train_samples: int) -> int:
    """Samples of one training epoch: the split, or ``max_steps_per_epoch`` batches where fewer."""
    if recipe.max_steps_per_epoch is None:
        return train_samples
    return min(train_samples, recipe.max_steps_per_epoch * recipe.batch_size)


def pretrain_work(recipe: TrainRecipe, splits: Mapping[str, int]) -> Work:
    """One FP32 pretraining: ``pretrain_epochs`` and their val passes."""
    epochs = recipe.pretrain_epochs
    return Work(epochs, epochs * epoch_images(recipe, splits["train"]),
                math.ceil(epochs / recipe.eval_every) * splits["val"])


def compress_work(recipe: TrainRecipe, splits: Mapping[str, int], method: Method) -> Work:
    """One compression run of ``method`` (with its merged hyperparameters) at one budget and seed."""
    epochs = recipe.epochs if method.trains else 0
    val_passes = math.ceil(epochs / recipe.eval_every) + FINAL_VAL_PASSES
    recalibration = min(splits["train"], recipe.bn_recalibration_batches * recipe.batch_size)
    search_train, search_eval = method.search_images(method.hp, splits["train"], splits["val"])
    return Work(epochs, epochs * epoch_images(recipe, splits["train"]),
                val_passes * splits["val"] + FINAL_TEST_PASSES * splits["test"] + recalibration,
                search_train, search_eval)


def estimate(config: BenchConfig, img_per_s: Mapping[str, float] | None = None) -> list[Row]:
    """Every (dataset, model)'s pretraining and every (dataset, model, method) of ``config``, in
    config order; ``img_per_s`` maps ``<dataset>/<model>`` to its training throughput."""
    from jpqbench.base.method_spec import make_method
    from jpqbench.pipeline.grid import grid

    img_per_s = img_per_s or {}
    runs = Counter((point.dataset, point.model, point.method) for point in grid(config))
    rows = []
    for dataset, model in config.benchmarks():
        recipe, splits, seeds = config.recipe(dataset, model), split_samples(dataset), len(config.seeds_of(dataset))
        rate = img_per_s.get(f"{dataset}/{model}")
        rows.append(Row(dataset, model, PRETRAIN, PRETRAIN, seeds, seeds, pretrain_work(recipe, splits), rate))
        for spec in config.methods:
            method = make_method(spec, config.method_params_of(dataset, model))
            kind = "compress" if method.takes_budget else "reference"  # the Snakefile's RUN_RULES
            count = runs[dataset, model, spec]
            rows.append(Row(dataset, model, spec, f"{kind}_{dataset}" if config.batch_runs else kind, count,
                            1 if config.batch_runs else count, compress_work(recipe, splits, method), rate))
    return rows


def _figure(key: str, value: object, source: str) -> tuple[str, float]:
    """A checked throughput entry ``<dataset>/<model>`` -> images per second; ``source`` names its origin."""
    dataset, slash, model = key.partition("/")
    if not slash or not dataset or not model or "/" in model:
        raise UserError(f"{source}: {key!r} is not <dataset>/<model>", "write e.g. cifar10/resnet20")
    for registry, name in ((DATASETS, dataset), (MODELS, model)):
        try:
            registry.get(name)
        except UserError as error:
            raise UserError(f"{source}: {error.problem}", error.fix) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{source}: the throughput of {key} is {value!r}, not a positive number of images per second",
                        "give training images per second, e.g. 21500")
    return key, float(value)


def read_throughput(path: Path) -> tuple[str | None, dict[str, float]]:
    """The device and the ``img_per_s`` figures of a throughput file (the module doc's format)."""
    fix = f"pass the JSON that benchmarks/throughput.py writes: {THROUGHPUT_FORMAT}"
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"throughput file {path} cannot be read ({error.strerror or error})", fix) from None
    except ValueError as error:  # not JSON, or not text
        raise UserError(f"throughput file {path} is not valid JSON ({error})", fix) from None
    figures = raw.get("img_per_s") if isinstance(raw, dict) else None
    if not isinstance(figures, dict):
        raise UserError(f'throughput file {path} holds no "img_per_s" mapping', fix)
    device = raw.get("device")
    return (str(device) if device is not None else None,
            dict(_figure(key, value, f"throughput file {path}") for key, value in figures.items()))


def parse_img_per_s(items: Iterable[str]) -> dict[str, float]:
    """``--img-per-s DATASET/MODEL=N`` arguments as figures (a later one for the same pair wins)."""
    figures = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals:
            raise UserError(f"--img-per-s {item!r} is not DATASET/MODEL=N",
                            "write e.g. --img-per-s cifar10/resnet20=21500")
        try:
            value: object = float(text)
        except ValueError:
            value = text
        key, rate = _figure(key.strip(), value, f"--img-per-s {item!r}")
        figures[key] = rate
    return figures


@dataclass(frozen=True)
class Runtime:
    """The suggested SLURM runtime of one rule, or the benchmarks whose missing throughput prevents one."""

    rule: str
    minutes: int | None
    longest: Row | None
    missing: list[str]


def slurm_runtimes(rows: list[Row]) -> list[Runtime]:
    """Per rule, in row order: its longest job x :data:`SAFETY_FACTOR`, in whole minutes."""
    runtimes = []
    for rule in dict.fromkeys(row.rule for row in rows):
        members = [row for row in rows if row.rule == rule]
        missing = sorted({row.benchmark for row in members if row.img_per_s is None})
        if missing:
            runtimes.append(Runtime(rule, None, None, missing))
            continue
        longest = max(members, key=lambda row: row.job_hours)
        runtimes.append(Runtime(rule, max(1, math.ceil(longest.job_hours * 60 * SAFETY_FACTOR)), longest, []))
    return runtimes


def totals(rows: list[Row]) -> dict[str, Any]:
    """Sums over ``rows``; device-hours over the rows with a throughput (None: no row has one), and
    which rows lack one."""
    work = Work(*(sum(column) for column in zip(*(astuple(row.total) for row in rows))))
    known = [row.hours(row.runs) for row in rows if row.img_per_s is not None]
    unknown = [row for row in rows if row.img_per_s is None]
    return {"jobs": sum(row.jobs for row in rows), "runs": sum(row.runs for row in rows), **vars(work),
            "device_hours": sum(known) if known else None,
            "rows_unknown": len(unknown), "unknown_benchmarks": sorted({row.benchmark for row in unknown})}


def to_json(rows: list[Row], device: str | None, slurm: bool) -> dict[str, Any]:
    """The estimate as one JSON-ready mapping (``--json``)."""
    report = {"device": device, "eval_weight": EVAL_WEIGHT, "rows": [row.to_dict() for row in rows],
              "totals": totals(rows)}
    if slurm:
        report["slurm_runtime_min"] = {runtime.rule: runtime.minutes for runtime in slurm_runtimes(rows)}
    return report


def _count(value: float) -> str:
    """A count in three significant digits with a k/M/G/T suffix."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _amount(value: float | None) -> str:
    """Hours or minutes: three significant digits below 100, whole numbers above; "—" for unknown."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def render_table(rows: list[Row], timed: bool, device: str | None) -> str:
    """The rows and their totals as text; the device-hours column only when ``timed``."""
    header = ["dataset/model", "method", "rule", "jobs", "runs", "epochs", "train img", "eval img", "search img"]
    table = [header + (["device-h"] if timed else [])]
    for row in rows:
        total = row.total
        table.append([row.benchmark, row.method, row.rule, str(row.jobs), str(row.runs), f"{total.epochs:,}",
                      _count(total.train_images), _count(total.eval_images), _count(total.search_images)]
                     + ([_amount(row.hours(row.runs))] if timed else []))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(line, widths))).rstrip() for line in table]
    summed = totals(rows)
    lines.append(f"total: {summed['jobs']:,} jobs, {summed['runs']:,} runs, {summed['epochs']:,} epochs, "
                 f"{_count(summed['train_images'])} training + {_count(summed['eval_images'])} evaluation + "
                 f"{_count(summed['search_train_images'] + summed['search_eval_images'])} search images")
    if timed:
        lines.append(f"device-hours: {_amount(summed['device_hours'])}"
                     + (f" on {device}" if device else "") + _unknown_note(summed, len(rows)))
    return "\n".join(lines)


def _unknown_note(summed: Mapping[str, Any], rows: int) -> str:
    if not summed["rows_unknown"]:
        return ""
    return (f", for {rows - summed['rows_unknown']} of {rows} rows: {summed['rows_unknown']} unknown (no throughput "
            f"for {', '.join(summed['unknown_benchmarks'])})")


def render_slurm(rows: list[Row]) -> str:
    """Suggested runtimes as YAML lines for the ``set-resources`` of profiles/slurm/config.yaml."""
    lines = [f"# SLURM runtime per rule, in minutes: its longest job x {SAFETY_FACTOR:g} "
             "(set under set-resources in profiles/slurm/config.yaml)", "set-resources:"]
    for runtime in slurm_runtimes(rows):
        if runtime.minutes is None:
            lines.append(f"  # {runtime.rule}: none: no throughput for {', '.join(runtime.missing)} "
                         "(give it with --img-per-s DATASET/MODEL=N)")
            continue
        longest = runtime.longest
        lines += [f"  {runtime.rule}:", f"    runtime: {runtime.minutes}  # longest job: {longest.benchmark} "
                  f"{longest.method}, {_amount(longest.job_hours * 60)} min"]
    return "\n".join(lines)
