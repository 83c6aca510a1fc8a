"""Real compressed artifacts: physically pruned, BN-folded, bit-packed; measured size, accuracy, latency.

:func:`export_run` runs inside a compression run's process, right after the run is
evaluated (a new process would cost seconds of imports per run), and again from
``jpqbench export --run-dir DIR`` for a finished run. It

1. builds the artifact (:mod:`jpqbench.export.build`) and writes ``model.jpq``
   (format: :mod:`jpqbench.export.artifact`, docs/artifact-format.md);
2. loads the file back with the loader -- the model that is measured is the one a user gets;
3. measures: file size beside the counter's ``weight_bits`` (they must differ by exactly the
   computed overhead), test accuracy of the loaded model beside the fake-quantized one (a
   difference above 0.1 pp sets ``export_flagged``), the largest output difference on a
   training batch, and CPU latency of the dense and the physically pruned float32 model,
   both with BN folded (:mod:`jpqbench.export.latency`).

The export is CPU work whatever the run's device: :func:`export_run` moves the compressed
model to the CPU and reads the test split there, and the latency it reports is CPU latency.

ONNX is not written: the ``onnx`` package is not a dependency of jpqbench (and torch's
exporter needs ``onnxscript`` as well); the loaded PyTorch model can be passed to
``torch.onnx.export`` where those are installed.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jpqbench.accounting.plan import CompressionPlan
from jpqbench.base import atomic
from jpqbench.export.artifact import _PREFIX, quantize_activations, read, to_bytes, to_model
from jpqbench.export.build import build_artifact
from jpqbench.export.latency import latency_figures
from jpqbench.harness.data import DataBundle
from jpqbench.harness.evaluate import evaluate

ARTIFACT_NAME = "model.jpq"
ACCURACY_TOLERANCE_PP = 0.1


def export_run(compressed: nn.Module, plan: CompressionPlan, *, model_name: str, data: DataBundle,
               batch: torch.Tensor, batch_size: int, path: Path, weight_bits: float, top1: float,
               latency_batches: tuple[int, ...] = (1, 32)) -> tuple[dict[str, Any], dict[str, float]]:
    """Write ``path`` and return ``(metrics, details)``: the summary columns and the size breakdown.

    ``weight_bits`` and ``top1`` are the run's counted weight size and fake-quant test accuracy.
    ``compressed`` is moved to the CPU (in place), where the export and its measurements run.
    """
    start = time.perf_counter()
    compressed, batch = compressed.cpu(), batch.cpu()
    data = dataclasses.replace(data, device=torch.device("cpu"))
    built = build_artifact(compressed, plan, model_name, data.num_classes, tuple(data.input_shape), batch)
    raw = to_bytes(built.artifact)
    built.size.header = 8 * (_PREFIX.size + _PREFIX.unpack_from(raw)[2])
    atomic.write_bytes(path, raw)
    stored = read(path)  # the file, not the in-memory artifact: what a user would load
    physical = to_model(stored, quantize_inputs=False)
    exported = quantize_activations(copy.deepcopy(physical), stored)
    with torch.no_grad():
        output_diff = float((exported(batch) - compressed.eval()(batch)).abs().max())
    export_top1 = evaluate(exported, data, "test", batch_size)["top1"]
    delta_pp = (export_top1 - top1) * 100
    size = built.size
    metrics: dict[str, Any] = {
        "artifact_bytes": len(raw),
        "artifact_counted_bytes": weight_bits / 8,
        "artifact_overhead_bytes": size.overhead / 8,
        "artifact_size_ok": bool(size.counted == weight_bits and size.total == 8 * len(raw)),
        "export_top1": export_top1,
        "export_top1_delta_pp": delta_pp,
        "export_flagged": bool(abs(delta_pp) > ACCURACY_TOLERANCE_PP),
        "export_max_output_diff": output_diff,
        "export_weight_max_error": built.weight_max_error,
        **latency_figures({"dense": built.dense, "pruned": physical}, tuple(data.input_shape), latency_batches),
    }
    metrics["export_time_s"] = time.perf_counter() - start
    return metrics, {f"artifact_bits/{key}": float(value) for key, value in size.to_dict().items()}
