"""Data-parallel training (DistributedDataParallel) for runs launched by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 -m jpqbench.cli run --method qat --dataset digits --budget 0.05
    jpqbench run --nproc 2 --method qat --dataset digits --budget 0.05       # the same, launched for you

Every process runs the whole run -- the method's searches, calibrations, projections and
the harness's checks -- on the full, unsharded data, identically (same seed, same start);
only the optimizer steps of ``ctx.train`` / :func:`jpqbench.train.fit` are distributed.
:func:`training_group` scopes that: a process group exists only while ``fit`` trains, so
:meth:`jpqbench.data.DataBundle.loader` shards the training batches there and nowhere else
(a calibration or a search on rank-specific batches would make the ranks' models differ).
Re-creating the group per training phase costs ~30 ms with gloo.

The recipe's ``batch_size`` is the *global* batch: each of N processes takes
``batch_size / N`` samples of its shard per step and DDP averages the gradients, so a step
is the step of one process on the union batch (exactly so for models without batch norm;
batch-norm statistics are per process, as in plain DDP -- no SyncBatchNorm), the number of
steps per epoch and the learning-rate schedule are those of a single-process run, and
results stay comparable across launch sizes. ``batch_size`` must divide by N.

Rank 0 alone writes files (training checkpoints, ``plan.json``, ``model.pt``,
``metrics.json``) and logs to MLflow. Backend: gloo (the harness trains on the CPU; nccl
would need the model on a GPU, which the harness does not place). A method that cannot run
distributed declares ``distributed = False`` and a distributed launch of it is refused
before any work (:func:`check_launch`).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
from torch import nn

from jpqbench.errors import UserError

if TYPE_CHECKING:
    from jpqbench.methods_api import Method


def world_size() -> int:
    """Processes in this launch (torchrun's ``WORLD_SIZE``; 1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a distributed one: the one that writes."""
    return rank() == 0


def check_launch(method_name: str, method_cls: type[Method], batch_size: int, processes: int | None = None) -> None:
    """Refuse a distributed launch that cannot run, naming why (before any work is done)."""
    processes = processes or world_size()
    if processes <= 1:
        return
    if not method_cls.distributed:
        raise UserError(f"method {method_name!r} runs in a single process only (its search or projection is "
                        f"global, see methods/{method_name.partition('[')[0]}.py) but {processes} processes "
                        "were launched", "run it without torchrun / --nproc")
    _check_split(batch_size, processes)


def _check_split(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(f"the recipe's batch_size {batch_size} (the global batch) does not divide by the "
                        f"{processes} processes", f"launch a number of processes that divides {batch_size}")


def shard_steps(samples: int, batch_size: int) -> tuple[int, int]:
    """(per-process batch, steps per epoch) for a global ``batch_size`` over ``samples``.

    Each process sees ``ceil(samples / N)`` samples (``DistributedSampler`` pads the shards to
    equal length) in batches of ``batch_size / N``; with N = 1 this is the plain loader.
    """
    processes = world_size()
    _check_split(batch_size, processes)
    per_process = batch_size // processes
    return per_process, math.ceil(math.ceil(samples / processes) / per_process)


@contextmanager
def training_group(model: nn.Module) -> Iterator[nn.Module]:
    """The module to train: ``model`` itself, or under torchrun ``model`` wrapped in DDP
    inside a gloo process group that lives as long as the block.

    DDP broadcasts rank 0's parameters and buffers when it wraps the model, so every rank
    starts the phase from the same weights, and averages the gradients, so the parameters stay
    equal. Buffers are not averaged: each rank's last forward updates its batch-norm running
    statistics with its own batch, so the block ends by copying rank 0's buffers to every rank
    -- the ranks leave a training phase bit-identical, and whatever the method does next
    (calibrate, prune, search) it does alike everywhere. A barrier then makes sure rank 0's
    last checkpoint is on disk before any rank goes on.

    ``find_unused_parameters``: methods train parameters that some steps do not use (a
    quantizer switched off for a phase, a gate frozen), which plain DDP refuses; the cost is
    one walk of the autograd graph per step.
    """
    if world_size() <= 1:
        yield model
        return
    if dist.is_initialized():
        raise RuntimeError("a process group is already active: training phases cannot nest")
    dist.init_process_group("gloo")
    try:
        yield nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def all_sum(*values: float) -> list[float]:
    """Sum ``values`` over the ranks (inside :func:`training_group`); unchanged in one process."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def all_finite(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank: a divergence stops all ranks at the same step
    (a rank stopping alone would leave the others waiting in the gradient all-reduce)."""
    finite = bool(torch.isfinite(loss))
    if not dist.is_initialized():
        return finite
    return all_sum(float(not finite))[0] == 0


def launch(processes: int, argv: list[str]) -> int:
    """Run ``jpqbench <argv>`` in ``processes`` local processes under torchrun; its exit code.

    ``--standalone`` picks a free local rendezvous port. For several nodes call torchrun
    yourself (``--nnodes``, ``--rdzv-endpoint``) with ``-m jpqbench.cli``.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "jpqbench.cli", *argv]
    return subprocess.run(command, check=False).returncode
