"""CPU inference latency: warm-up, then the median of timed repeats, per batch size.

Kept short on purpose (the export runs after every run of the grid): by default 2 warm-up
and 7 timed forward passes at batch 1 and at batch 32, in ``torch.inference_mode``, with the
thread count torch is using recorded beside the figures (the workflow pins it to the job's
threads). The dense and the pruned model take turns pass by pass, so the figures compare the
two models of one run under the same load; they are wall-clock medians on whatever else the
machine is doing, so absolute figures of different runs (or machines) compare only loosely --
the report plots the ratio pruned / dense.

The fastest pass is recorded beside the median: on a shared machine the median of identical
models came out bimodal (1.8 or 6.2 ms for the same digits_cnn at batch 32, model by model),
while the fastest pass stayed within 10 %; it estimates the latency without contention and is
what the report's ratio uses.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _time_ms(model: nn.Module, example: torch.Tensor) -> float:
    start = time.perf_counter()
    model(example)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def latency_figures(models: dict[str, nn.Module], input_shape: tuple[int, ...],
                    batch_sizes: tuple[int, ...] = (1, 32), warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    """``latency_<model>_b<batch>_ms`` (median wall time) and ``..._min_ms`` (fastest pass) for every model and
    batch size, plus ``latency_threads``.

    The models take turns, one forward pass each per repeat, so a change in the machine's load
    during the measurement falls on all of them alike.
    """
    figures: dict[str, float] = {"latency_threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    for model in models.values():
        model.eval()
    for batch in batch_sizes:
        example = torch.randn(batch, *input_shape, generator=generator)
        for _ in range(warmup):
            for model in models.values():
                model(example)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_time_ms(model, example))
        for name in models:
            figures[f"latency_{name}_b{batch}_ms"] = statistics.median(times[name])
            figures[f"latency_{name}_b{batch}_min_ms"] = min(times[name])
    return figures
