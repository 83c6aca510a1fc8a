"""One harness run, start to end: the code behind ``jpqbench pretrain`` and ``jpqbench run``.

A compression run:

1. validates its inputs (method, dataset, budget, checkpoint) before any work;
2. seeds everything (runs are deterministic on CPU for a seed);
3. loads the shared FP32 checkpoint onto the run's device and hands it to the method with a
   :class:`RunContext`;
4. evaluates on the test split **once** on the run's device; then, on the CPU, checks the
   returned plan against the model (:func:`jpqbench.accounting.verify.verify_plan`), counts the cost with
   the one counter, exports the real artifact ``model.jpq`` and measures it
   (:mod:`jpqbench.export`), and writes ``plan.json`` (and, for a method that projects its
   search's result onto the budget, ``searched_plan.json``: the plan before the projection,
   counted into ``searched_relative_bops``/``_size``), ``model.pt``, ``model.jpq`` and finally
   ``metrics.json`` -- each atomically, so an interrupted run never leaves a file that
   Snakemake would take as done;
5. mirrors everything into one MLflow run (the plan and the validated config as artifacts).

**Devices.** The config's ``device`` (``auto``: CUDA when torch sees a GPU, else the CPU;
``cuda:<LOCAL_RANK>`` under torchrun) is where the model trains, evaluates, calibrates and
where methods search: every batch comes from the data bundle on that device. The plan check,
the cost counter and the export work on the CPU (counts do not depend on the device; the
export's latency is CPU latency), and ``model.pt`` and the FP32 checkpoint hold CPU tensors, so
they load anywhere. ``metrics.json`` and MLflow record the device (``device``, e.g. ``cpu`` or
``cuda:0 (NVIDIA H100 80GB HBM3)``). CPU runs are bit-deterministic for a seed; CUDA runs set
``torch.use_deterministic_algorithms`` (warning, not failing, where an operation has no
deterministic kernel) and cuBLAS's deterministic workspace, so they are deterministic only as
far as torch's deterministic algorithms allow, and do not equal CPU runs bit for bit.

A run finished before with the same inputs (its outputs all present) is not redone: ``run``
returns its recorded metrics (delete the run folder to redo it; Snakemake deletes a job's
outputs before it reruns it).

Intermediate state lives in ``<out>/.work/`` (per-phase training checkpoints, the MLflow
run id): a killed run resumes from its last epoch and ends with the same result (bit for bit
on the CPU; on CUDA as far as torch's deterministic kernels reach, see :func:`seed_everything`). Beside the
outputs, the hidden ``.inputs.json`` and ``.mlflow_run_id`` (:class:`RunState`) record the
inputs the run was made for (method, hyperparameters, recipe, budget, seed, data and FP32
checkpoint) and its MLflow run: a rerun with the same inputs continues the same MLflow run
(even after a finished run's outputs were deleted), a rerun with other inputs closes the
interrupted attempt's MLflow run as KILLED ("abandoned") and starts afresh instead of resuming
from checkpoints of another run.

A run that diverges (a non-finite loss in training, or non-finite weights in the returned
model) is a result, not a crash: :func:`run_or_record_divergence` (what ``jpqbench run``
calls) writes its ``metrics.json`` with status ``diverged``, the reason and no figures, and
the grid goes on. An FP32 checkpoint pretrained on other data (its ``data_hash`` differs from
the prepared dataset's fingerprint) is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from jpqbench.accounting.counter import measure_activation_sparsity
from jpqbench.accounting.verify import verify_plan
from jpqbench.base import atomic
from jpqbench.base.budget import Budget
from jpqbench.base.config import BenchConfig, TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import get_method, make_method
from jpqbench.base.registry import DATASETS, MODELS
from jpqbench.export import ARTIFACT_NAME, export_run
from jpqbench.harness.data import DataBundle, file_sha256, loader_workers
from jpqbench.harness.distributed import (
    agree,
    check_launch,
    check_ranks_agree,
    describe_device,
    is_main_process,
    resolve_device,
    use_device,
    world_size,
)
from jpqbench.harness.evaluate import evaluate, recalibrate_batchnorm
from jpqbench.harness.method import Compressed, RunContext
from jpqbench.harness.train import TrainSpec, fit
from jpqbench.pipeline.grid import GridPoint
from jpqbench.pipeline.resume import RunState
from jpqbench.pipeline.tracking import Tracker, git_commit, tracked_run

SEARCHED_PLAN = "searched_plan.json"  # a projecting method's plan before the projection (see Compressed)


def seed_everything(seed: int, device: torch.device = torch.device("cpu")) -> None:
    """Seed Python, NumPy and torch (every device). On CUDA also ask for deterministic kernels
    (warn_only: an operation without one warns instead of failing the run) and cuBLAS's
    deterministic workspace; CPU kernels are deterministic already, and the switch costs ~2 s
    of imports. Some CUDA kernels have no deterministic version in torch (among those the
    methods use: the backward of ``cross_entropy`` and of adaptive average pooling, and
    ``scatter_reduce`` in DJPQ's soft cost): they warn, and a CUDA run -- a resumed one too --
    can then differ from another in the last bits."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def load_data(config: BenchConfig, dataset: str) -> DataBundle:
    """The dataset, delivering its batches on the run's device (the config's ``device``; its
    in-memory splits moved there when they fit), read from files by ``loader_workers`` workers."""
    device = use_device(config.device)
    bundle = DATASETS.get(dataset)().load(Path(config.data_root) / dataset)
    return dataclasses.replace(bundle, workers=loader_workers(config.loader_workers)).to(device)


def build_model(recipe: TrainRecipe, data: DataBundle) -> nn.Module:
    return MODELS.get(recipe.model)(data.num_classes, data.input_shape)


def default_checkpoint(config: BenchConfig, dataset: str, model: str, seed: int) -> Path:
    return Path(config.results_root) / "checkpoints" / dataset / model / f"s{seed}.pt"


def default_run_dir(config: BenchConfig, point: GridPoint) -> Path:
    return point.run_dir(Path(config.results_root) / "runs")


def _check_finite(model: nn.Module) -> None:
    """Raise FloatingPointError (divergence) if any weight or buffer of ``model`` is NaN or infinite."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"the returned model's {name} holds non-finite values")


def pretrain(config: BenchConfig, dataset: str, model_name: str, seed: int, out: Path) -> dict[str, Any]:
    """Train the shared FP32 starting point of (dataset, model, seed); write it to ``out``."""
    wall_start = time.perf_counter()
    recipe = config.recipe(dataset, model_name)
    data = load_data(config, dataset)
    seed_everything(seed, data.device)
    model = build_model(recipe, data)  # built on the CPU (the same initial weights on every device), trained on data.device
    out.parent.mkdir(parents=True, exist_ok=True)
    state = RunState(out.with_name(out.stem + ".work"), f"{out.parent}/.{out.stem}.")
    work = state.work
    agree(lambda: state.claim(config, {"recipe": recipe.model_dump(), "seed": seed, "data": data.fingerprint}))
    spec = TrainSpec(epochs=recipe.pretrain_epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                     optimizer=recipe.optimizer, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                     max_steps_per_epoch=recipe.max_steps_per_epoch, eval_every=recipe.eval_every,
                     precision=recipe.precision, channels_last=recipe.channels_last)
    tags = {"stage": "pretrain", "dataset": dataset, "model": recipe.model, "seed": seed,
            "data_hash": data.fingerprint}
    with tracked_run(config, f"pretrain/{dataset}/{recipe.model}/s{seed}", state.id_file, tags,
                     entry_point="pretrain") as tracker:
        tracker.log_dataset(data.name, data.fingerprint, Path(config.data_root) / dataset)
        tracker.log_params({**recipe.model_dump(), "seed": seed, "device": describe_device(data.device)})
        result = fit(model, data, spec, seed=seed, phase="pretrain", checkpoint=work / "train.pt",
                     log=tracker.log_metrics)
        check_ranks_agree(model, {})
        if not is_main_process():  # under torchrun: training is over, the ranks' models are identical; rank 0 writes
            return {}
        figures = {"val_top1": result.history[-1]["val_top1"], "compute_time_s": result.compute_s, "train_time_s": result.wall_s,
                   "wall_time_s": time.perf_counter() - wall_start}
        tracker.log_metrics(figures, recipe.pretrain_epochs)
        atomic.torch_save({"state_dict": model.cpu().state_dict(), "model": recipe.model, "dataset": dataset,
                            "num_classes": data.num_classes, "input_shape": list(data.input_shape), "seed": seed,
                            "data_hash": data.fingerprint, **figures}, out)
    state.release()
    return figures


def load_checkpoint(path: Path, recipe: TrainRecipe, data: DataBundle) -> nn.Module:
    """Rebuild the FP32 model and load its weights, refusing a checkpoint of something else."""
    if not path.is_file():
        raise UserError(f"FP32 checkpoint {path} does not exist",
                        f"create it with `jpqbench pretrain --dataset {data.name} --model {recipe.model} --seed <seed>`")
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        info = {key: state[key] for key in ("model", "dataset", "state_dict")}
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the same user problem
        raise UserError(f"FP32 checkpoint {path} is unreadable or malformed ({type(error).__name__})",
                        "delete it and run `jpqbench pretrain` again") from None
    if info["model"] != recipe.model or info["dataset"] != data.name:
        raise UserError(f"checkpoint {path} holds {info['model']} on {info['dataset']}, "
                        f"but the run needs {recipe.model} on {data.name}",
                        "pass the checkpoint pretrained for this dataset and model")
    if state.get("data_hash", data.fingerprint) != data.fingerprint:
        raise UserError(f"checkpoint {path} was pretrained on other {data.name} data (fingerprint "
                        f"{state['data_hash']}; the prepared data's is {data.fingerprint})",
                        "pretrain it again on the prepared data (delete it and rerun), or restore the data it was "
                        "trained on")
    model = build_model(recipe, data)
    try:
        model.load_state_dict(info["state_dict"])
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not fit model {recipe.model}: {str(error)[:300]}",
                        "pretrain it again with the current code") from None
    return model


@dataclass
class RunRequest:
    method: str
    dataset: str
    model: str
    seed: int
    budget: Budget | None
    checkpoint: Path
    out: Path
    epochs: int | None = None
    pretrain_if_missing: bool = False  # train the FP32 checkpoint first when it does not exist


def validate_request(config: BenchConfig, request: RunRequest, processes: int | None = None) -> None:
    """Refuse a request that cannot run, before any data is loaded or work is done.

    ``processes``: how many processes will train it (``--nproc``, checked before torchrun is
    launched); default: this launch's world size."""
    resolve_device(config.device, processes)  # `cuda` without a GPU, or fewer GPUs than processes
    config.recipe(request.dataset, request.model)  # the pair must be in the grid
    method_cls = get_method(request.method)
    if method_cls.takes_budget and request.budget is None:
        raise UserError(f"method {request.method!r} needs a budget", "pass --budget (e.g. 0.05) and --budget-metric")
    if not method_cls.takes_budget and request.budget is not None:
        raise UserError(f"method {request.method!r} is a reference and takes no budget", "omit --budget")
    if request.epochs is not None and request.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {request.epochs}", "pass a positive number of epochs")
    processes = processes or world_size()
    check_launch(request.method, method_cls.distributed, config.recipe(request.dataset, request.model).batch_size, processes)
    if processes > 1 and not request.checkpoint.exists():
        raise UserError(f"FP32 checkpoint {request.checkpoint} does not exist and a distributed run does not "
                        "pretrain it on the fly", "run `jpqbench pretrain` first (it may run under torchrun too)")


def run(config: BenchConfig, request: RunRequest, data: DataBundle | None = None) -> dict[str, Any]:
    """Compress, verify, count, evaluate and record one (method, dataset, budget, seed).

    ``data``: the dataset already loaded by the caller (several budgets in one process);
    loaded here when omitted.
    """
    validate_request(config, request)
    data = data or load_data(config, request.dataset)
    recipe = config.recipe(request.dataset, request.model)
    if request.pretrain_if_missing and not request.checkpoint.exists():
        pretrain(config, request.dataset, request.model, request.seed, request.checkpoint)
    wall_start = time.perf_counter()
    seed_everything(request.seed, data.device)
    model = load_checkpoint(request.checkpoint, recipe, data).to(data.device)
    method = make_method(request.method, config.method_params_of(request.dataset, recipe.model))
    out, work = request.out, request.out / ".work"
    epochs = request.epochs or recipe.epochs
    budget = request.budget
    state = RunState.of_run(out)
    inputs = {"method": request.method, "hparams": method.hp.model_dump(), "recipe": recipe.model_dump(),
              "epochs": epochs, "seed": request.seed, "budget": budget.key if budget else None,
              "data": data.fingerprint, "checkpoint": file_sha256(request.checkpoint)}
    outputs = ("plan.json", "model.pt", ARTIFACT_NAME)

    def begin() -> dict[str, Any] | None:  # rank 0 decides for every rank (agree)
        recorded = state.finished(inputs, outputs)
        if recorded is None:
            for stale in ("metrics.json", *outputs):
                (out / stale).unlink(missing_ok=True)
            state.claim(config, inputs)
        return recorded

    recorded = agree(begin)
    if recorded is not None:
        if is_main_process():
            print(f"{out} finished before with the same inputs: not run again (delete it to redo it)",
                  file=sys.stderr)
        return recorded if is_main_process() else {}
    tags = {"stage": "compress", "method": request.method, "dataset": request.dataset, "model": recipe.model,
            "budget": budget.target if budget else "reference", "budget_metric": budget.metric if budget else "",
            "seed": request.seed, "data_hash": data.fingerprint}
    run_name = GridPoint(request.dataset, request.model, request.method, budget, request.seed).run_dir(Path()).as_posix()
    with tracked_run(config, run_name, state.id_file, tags, entry_point="run") as tracker:
        tracker.log_dataset(data.name, data.fingerprint, Path(config.data_root) / request.dataset)
        tracker.log_params({**{f"recipe.{k}": v for k, v in recipe.model_dump().items()}, "epochs": epochs,
                            "device": describe_device(data.device),
                            **{f"hp.{k}": v for k, v in method.hp.model_dump().items()}})
        ctx = RunContext(data=data, recipe=recipe, epochs=epochs if method.trains else 0, seed=request.seed, work_dir=work,
                         log_metrics=tracker.log_metrics, autocast=method.autocast)
        compressed = method.compress(model, budget, ctx)
        _check_finite(compressed.model)
        check_ranks_agree(compressed.model, compressed.plan.to_dict()["layers"])  # its notes may hold timings
        if not is_main_process():  # under torchrun: training is over, the ranks' models are identical; rank 0 finishes
            return {}
        compressed.plan.method = request.method
        compressed.model.to(data.device)
        if recipe.bn_recalibration_batches:  # the same for every method: part of the recipe
            recalibrate_batchnorm(compressed.model, ctx.calibration_batches(recipe.bn_recalibration_batches))
        val = evaluate(compressed.model, data, "val", recipe.batch_size)
        test = evaluate(compressed.model, data, "test", recipe.batch_size)  # the one touch of the test split
        # ...and a measurement on the same data, selecting nothing: zeros each layer really receives
        measured = measure_activation_sparsity(compressed.model,
                                               (x for x, _ in data.loader("test", recipe.batch_size)))
        tracker.log_metrics({f"measured_activation_sparsity/{name}": value for name, value in measured.items()}, 0)
        # the checks, the count, the export and model.pt on the CPU (see the module doc)
        compressed.model.cpu()
        batch = next(iter(ctx.calibration_batches(1))).cpu()  # training inputs: the plan check, the export's tables
        verify_plan(compressed.plan, compressed.model, batch)
        cost = ctx.cost(compressed.model, compressed.plan)
        # what the method's search reached before its projection onto the budget, same counter
        searched = ctx.cost(compressed.model, compressed.searched) if compressed.searched else None
        # the real artifact: physically pruned, bit-packed, loaded back and measured (jpqbench/export)
        exported, artifact_bits = export_run(
            compressed.model, compressed.plan, model_name=recipe.model, data=data,
            batch=batch, batch_size=recipe.batch_size,
            path=work / ARTIFACT_NAME, weight_bits=cost.weight_bits, top1=test["top1"])
        tracker.log_metrics(artifact_bits, 0)
        achieved = cost.relative(budget.metric) if budget else None
        metrics = {
            "dataset": request.dataset, "model": recipe.model, "method": request.method,
            "budget_metric": budget.metric if budget else None, "budget": budget.target if budget else None,
            "seed": request.seed, "epochs": epochs, "epochs_used": ctx.epochs_used,
            "top1": test["top1"], "top5": test["top5"], "val_top1": val["top1"],
            "measured_activation_sparsity": statistics.fmean(measured.values()),
            **cost.to_dict(),
            **exported,
            "achieved": achieved, "target_met": None if budget is None else bool(achieved <= budget.target * 1.10),
            "searched_relative_bops": searched.relative_bops if searched else None,
            "searched_relative_size": searched.relative_size if searched else None,
            # set by a method when this operating point is one its paper never ran (the report flags it)
            "outside_paper_regime": compressed.plan.notes.get("outside_paper_regime"),
            "compute_time_s": sum(r.compute_s for r in ctx.train_results),
            "train_time_s": sum(r.wall_s for r in ctx.train_results),
            "search_time_s": ctx.search_s,
            "train_precision": ctx.train_precision,  # fp32 unless the method declares autocast support
            "status": "ok", "mlflow_run_id": tracker.run_id, "data_hash": data.fingerprint,
            "device": describe_device(data.device), "git_commit": git_commit(),
        }
        _write_outputs(config, compressed, metrics, wall_start, out, work, tracker)
    state.release()
    return metrics


def run_or_record_divergence(config: BenchConfig, request: RunRequest,
                             data: DataBundle | None = None) -> dict[str, Any]:
    """:func:`run`; a run that diverges is recorded and its metrics returned instead of raised.

    The record is ``metrics.json`` with status ``diverged``, the reason (``error``) and every
    figure empty; the MLflow run was closed as FAILED with the tags ``status`` and ``error`` by
    :func:`jpqbench.pipeline.tracking.tracked_run`. No ``plan.json`` or ``model.pt`` is written: there is
    no trustworthy model to describe. Rerunning it diverges again (runs are deterministic), so
    its work folder is released like a finished run's.
    """
    from jpqbench.pipeline.aggregate import COLUMNS  # lazily: pandas is only needed here

    data = data or load_data(config, request.dataset)
    try:
        return run(config, request, data)
    except FloatingPointError as error:
        if not is_main_process():
            return {}
        recipe, budget = config.recipe(request.dataset, request.model), request.budget
        state = RunState.of_run(request.out)
        metrics = {**dict.fromkeys(COLUMNS), "dataset": request.dataset, "model": recipe.model,
                   "method": request.method, "budget_metric": budget.metric if budget else None,
                   "budget": budget.target if budget else None, "seed": request.seed,
                   "epochs": request.epochs or recipe.epochs, "status": "diverged", "error": str(error),
                   "mlflow_run_id": state.id_file.read_text().strip() if state.id_file.is_file() else None,
                   "data_hash": data.fingerprint, "device": describe_device(data.device), "git_commit": git_commit()}
        atomic.write_text(request.out / "metrics.json", json.dumps(metrics, indent=1))
        state.release()
        return metrics


def _write_outputs(config: BenchConfig, compressed: Compressed, metrics: dict[str, Any], wall_start: float,
                   out: Path, work: Path, tracker: Tracker) -> None:
    """plan.json (and searched_plan.json, for a method that projects onto its budget) and model.pt,
    then metrics.json last (its presence marks a finished run); each written atomically. The plans
    and config also go to MLflow as artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    compressed.plan.save(work / "plan.json")
    (work / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    tracker.log_artifact(work / "plan.json")
    (out / SEARCHED_PLAN).unlink(missing_ok=True)
    if compressed.searched is not None:  # the plan behind searched_relative_*, so that figure can be recounted
        compressed.searched.save(work / SEARCHED_PLAN)
        tracker.log_artifact(work / SEARCHED_PLAN)
        os.replace(work / SEARCHED_PLAN, out / SEARCHED_PLAN)
    tracker.log_artifact(work / "config.yaml")
    tracker.log_artifact(work / ARTIFACT_NAME)
    os.replace(work / ARTIFACT_NAME, out / ARTIFACT_NAME)
    atomic.write_text(out / "plan.json", (work / "plan.json").read_text())
    atomic.torch_save({"model": compressed.model, "plan": compressed.plan.to_dict()}, out / "model.pt")
    metrics["wall_time_s"] = time.perf_counter() - wall_start
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, metrics["epochs"])
    tracker.set_tags({"target_met": metrics["target_met"], "status": "ok",
                      **({"outside_paper_regime": metrics["outside_paper_regime"]}
                         if metrics["outside_paper_regime"] else {})})
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=1))
