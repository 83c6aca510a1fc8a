"""Collect the runs' ``metrics.json`` files into one tidy table: ``results/summary.csv``.

One row per run, one column per figure, so every later view (the comparison table, the
Pareto plots, a user's own pandas session) is a ``groupby`` away and none of them reads run
folders itself.

:func:`aggregate` reads exactly the runs of the config's grid (:mod:`jpqbench.pipeline.grid`, the same
definition the Snakefile requests), so the summary of a config never picks up stale runs of
an earlier, larger grid that are still on disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from jpqbench.base.config import BenchConfig
from jpqbench.base.errors import UserError
from jpqbench.pipeline.grid import grid

# The columns every metrics.json must hold (the runner's contract) and their dtypes. Nullable
# dtypes, because a reference run has no budget, top-5 is null for <= 10 classes, and a failed
# run may lack figures. The same schema types the CSV when it is read back (read_summary).
COLUMNS: dict[str, str] = {
    "dataset": "string",
    "model": "string",
    "method": "string",
    "budget_metric": "string",
    "budget": "Float64",
    "seed": "Int64",
    "epochs": "Int64",
    "top1": "Float64",
    "top5": "Float64",
    "val_top1": "Float64",
    "relative_bops": "Float64",
    "relative_size": "Float64",
    "bops": "Float64",
    "macs": "Float64",
    "weight_bits": "Float64",
    "weight_size_kb": "Float64",
    "params": "Int64",
    "nonzero_params": "Int64",
    "target_met": "boolean",
    "train_time_s": "Float64",
    "compute_time_s": "Float64",
    "wall_time_s": "Float64",
    "search_time_s": "Float64",
    "status": "string",
    "mlflow_run_id": "string",
    "git_commit": "string",
    "data_hash": "string",
}
# The real artifact's figures (jpqbench/export; metrics.json keys of the same names): typed like
# the schema, after it. A run without them (one that diverged) has them empty.
EXPORT_COLUMNS: dict[str, str] = {
    "artifact_bytes": "Int64",  # model.jpq on disk
    "artifact_counted_bytes": "Float64",  # the counter's weight_bits / 8
    "artifact_overhead_bytes": "Float64",  # header, scales, folded biases, activation tables (exact)
    "artifact_size_ok": "boolean",  # artifact = counted + overhead, to the bit
    "export_top1": "Float64",  # the loaded artifact's test top-1
    "export_top1_delta_pp": "Float64",  # export_top1 - top1, percentage points
    "export_flagged": "boolean",  # |delta| > 0.1 pp
    "export_max_output_diff": "Float64",
    "export_weight_max_error": "Float64",
    "latency_threads": "Int64",
    "latency_dense_b1_ms": "Float64",
    "latency_pruned_b1_ms": "Float64",
    "latency_dense_b32_ms": "Float64",
    "latency_pruned_b32_ms": "Float64",
    "latency_dense_b1_min_ms": "Float64",  # the fastest pass (see jpqbench/export/latency.py)
    "latency_pruned_b1_min_ms": "Float64",
    "latency_dense_b32_min_ms": "Float64",
    "latency_pruned_b32_min_ms": "Float64",
    "export_time_s": "Float64",
}
# What a method reports about its own result beyond the plan (jpqbench.pipeline.runner; metrics.json keys of
# the same names), typed after the export's figures. Empty for a method that does not project onto
# its budget / whose paper ran this operating point, and in runs recorded before these keys existed.
METHOD_COLUMNS: dict[str, str] = {
    "searched_relative_bops": "Float64",  # the search's own result, before the projection onto the budget
    "searched_relative_size": "Float64",
    "outside_paper_regime": "string",  # why this operating point is one the method's paper never ran
}
OPTIONAL_COLUMNS = {**EXPORT_COLUMNS, **METHOD_COLUMNS}
RUN_DIR_COLUMN = "run_dir"  # added by aggregate: the run's folder relative to the runs root
# The outcomes of a finished run (jpqbench.pipeline.runner): "diverged" runs have a metrics.json with
# the reason (key "error") and no figures; they are listed in the summary, never averaged.
STATUSES = ("ok", "diverged")
SORT_KEYS = ["dataset", "model", "method", "budget_metric", "budget", "seed"]


def _fits(value: object, dtype: str) -> bool:
    """Whether a JSON value can stand in a column of ``dtype`` (null fits every column)."""
    if value is None:
        return True
    if dtype == "string":
        return isinstance(value, str)
    if dtype == "boolean" or isinstance(value, bool):
        return dtype == "boolean" and isinstance(value, bool)
    return isinstance(value, int) if dtype == "Int64" else isinstance(value, (int, float))


def _read_metrics(path: Path, runs_root: Path) -> dict:
    """One run's metrics.json, checked against the schema: a malformed file is refused, naming
    the file and the key, rather than turned into a wrong row or a deep pandas error."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})", "delete the run folder and run it again") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} holds a JSON {type(record).__name__}, not an object of figures",
                        "delete the run folder and run it again")
    missing = [column for column in COLUMNS if column not in record]
    if missing:
        raise UserError(f"{path} lacks the keys {', '.join(missing)}",
                        "run it again with the current `jpqbench run`, which writes them all")
    wrong = [f"{column}={record[column]!r} (not {dtype})" for column, dtype in COLUMNS.items()
             if not _fits(record[column], dtype)]
    if record["status"] not in STATUSES:
        wrong.append(f"status={record['status']!r} (not one of {', '.join(STATUSES)})")
    elif record["status"] == "ok" and record["top1"] is None:
        wrong.append("top1=None in a run whose status is ok")
    if wrong:
        raise UserError(f"{path} is malformed: {'; '.join(wrong)}",
                        "delete the run folder and run it again (`snakemake` re-runs it)")
    return {**record, RUN_DIR_COLUMN: path.parent.relative_to(runs_root).as_posix()}


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Schema columns first, in schema order and dtypes, then the export's and the method's; any further figures after them."""
    typed = {**COLUMNS, **OPTIONAL_COLUMNS}
    frame = frame.reindex(columns=[*frame.columns, *(column for column in OPTIONAL_COLUMNS if column not in frame)])
    extra = [column for column in frame.columns if column not in typed]
    return frame[[*typed, *extra]].astype(typed)


def aggregate(runs_root: Path, out_csv: Path, config: BenchConfig | None = None) -> pd.DataFrame:
    """Read the runs' metrics.json into one row each, write them to ``out_csv`` and return them.

    With ``config``, exactly the runs of its grid are read and a missing one is an error (a
    summary with holes would make means over seeds silently use fewer seeds); without it, every
    metrics.json under ``runs_root``.
    """
    runs_root = Path(runs_root)
    if config is None:
        paths = sorted(runs_root.rglob("metrics.json"))
        if not paths:
            raise UserError(f"no metrics.json under {runs_root}", "run the grid first (`snakemake`)")
    else:
        paths = [point.run_dir(runs_root) / "metrics.json" for point in grid(config)]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise UserError(f"{len(missing)} of the grid's {len(paths)} runs have no metrics.json, "
                            f"e.g. {', '.join(missing[:3])}", "run the missing runs (`snakemake`)")
    frame = _typed(pd.DataFrame.from_records([_read_metrics(path, runs_root) for path in paths]))
    frame = frame.sort_values(SORT_KEYS, na_position="first", ignore_index=True)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


def read_summary(summary_csv: Path) -> pd.DataFrame:
    """Read a summary written by :func:`aggregate` back with its dtypes (a CSV does not keep them)."""
    return pd.read_csv(summary_csv, dtype={**COLUMNS, **OPTIONAL_COLUMNS})
