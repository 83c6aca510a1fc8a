"""CPU inference latency: warm-up, then the median of timed repeats, per batch size.

Kept short on purpose (the export runs after every run of the grid): by default 2 warm-up
and 7 timed forward passes at batch 1 and at batch 32, in ``torch.inference_mode``, with the
thread count torch is using recorded beside the figures (the workflow pins it to the job's
threads). The figures are wall-clock medians on whatever else the machine is doing, so they
compare the dense and the pruned model of one run, measured back to back -- not runs on
different machines or under different load.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def median_latency_ms(model: nn.Module, example: torch.Tensor, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``model(example)`` in milliseconds."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def latency_figures(models: dict[str, nn.Module], input_shape: tuple[int, ...],
                    batch_sizes: tuple[int, ...] = (1, 32), warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    """``latency_<model>_b<batch>_ms`` for every model and batch size, plus ``latency_threads``."""
    figures: dict[str, float] = {"latency_threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        example = torch.randn(batch, *input_shape, generator=generator)
        for name, model in models.items():
            figures[f"latency_{name}_b{batch}_ms"] = median_latency_ms(model, example, warmup, repeats)
    return figures
