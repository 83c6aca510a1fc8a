"""Re-export a finished run (``jpqbench export --run-dir DIR``): a new ``model.jpq`` and its figures.

Reads the run's ``metrics.json`` and ``model.pt``, exports as the run itself did (the same
calibration batch: the run's first training batch for its seed), then rewrites ``metrics.json``
with the new export columns and adds them, with the artifact, to the run's MLflow run when the
store knows it. Everything else in ``metrics.json`` stays as the run wrote it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jpqbench.accounting.plan import CompressionPlan
from jpqbench.base import atomic
from jpqbench.base.config import BenchConfig
from jpqbench.base.errors import UserError
from jpqbench.export import ARTIFACT_NAME, export_run


def _load_run(run_dir: Path) -> tuple[dict[str, Any], torch.nn.Module, CompressionPlan]:
    from jpqbench.base.registry import METHODS

    fix = "pass the folder of a finished run (it holds metrics.json and model.pt), or run it again"
    metrics_path, model_path = run_dir / "metrics.json", run_dir / "model.pt"
    if not metrics_path.is_file() or not model_path.is_file():
        raise UserError(f"{run_dir} is not a finished run (no metrics.json or model.pt)", fix)
    try:
        metrics = json.loads(metrics_path.read_text())
        needed = {key: metrics[key] for key in ("dataset", "model", "seed", "top1", "weight_bits")}
    except (json.JSONDecodeError, KeyError) as error:
        raise UserError(f"{metrics_path} is malformed ({error})", fix) from None
    METHODS.names()  # plugin classes must be importable to unpickle the model
    try:
        saved = torch.load(model_path, weights_only=False, map_location="cpu")
        model, plan = saved["model"], CompressionPlan.from_dict(saved["plan"])
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the same user problem
        raise UserError(f"{model_path} is unreadable ({type(error).__name__}: {str(error)[:200]})", fix) from None
    return {**metrics, **needed}, model, plan


def reexport(config: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """Export the finished run in ``run_dir`` again; return the export columns written to its metrics."""
    from jpqbench.harness.method import RunContext
    from jpqbench.pipeline.runner import load_data
    from jpqbench.pipeline.tracking import tracking_uri

    run_dir = Path(run_dir)
    metrics, model, plan = _load_run(run_dir)
    recipe = config.recipe(metrics["dataset"], metrics["model"])
    data = load_data(config, metrics["dataset"])
    ctx = RunContext(data=data, recipe=recipe, epochs=0, seed=int(metrics["seed"]), work_dir=run_dir / ".work")
    exported, details = export_run(model, plan, model_name=metrics["model"], data=data,
                                   batch=next(iter(ctx.calibration_batches(1))), batch_size=recipe.batch_size,
                                   path=run_dir / ARTIFACT_NAME, weight_bits=float(metrics["weight_bits"]),
                                   top1=float(metrics["top1"]))
    atomic.write_text(run_dir / "metrics.json", json.dumps({**metrics, **exported}, indent=1))
    if metrics.get("mlflow_run_id"):
        from jpqbench.pipeline.tracking import RetryingClient, Tracker

        tracker = Tracker(RetryingClient(tracking_uri(config)), metrics["mlflow_run_id"])
        tracker.log_metrics({**details, **{k: float(v) for k, v in exported.items()}}, 0)
        tracker.log_artifact(run_dir / ARTIFACT_NAME)
    return exported
