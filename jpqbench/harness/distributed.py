"""Data-parallel training (DistributedDataParallel) for runs launched by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 -m jpqbench.pipeline.cli run --method qat --dataset digits --budget 0.05
    jpqbench run --nproc 2 --method qat --dataset digits --budget 0.05       # the same, launched for you

Every process runs the whole run -- the method's searches, calibrations, projections and
the harness's checks -- on the full, unsharded data, identically (same seed, same start);
only the optimizer steps of ``ctx.train`` / :func:`jpqbench.harness.train.fit` are distributed.
:func:`training_group` scopes that: a process group exists only while ``fit`` trains, so
:meth:`jpqbench.harness.data.DataBundle.loader` shards the training batches there and nowhere else
(a calibration or a search on rank-specific batches would make the ranks' models differ).
Re-creating the group per training phase costs ~30 ms with gloo.

The recipe's ``batch_size`` is the *global* batch: each of N processes takes
``batch_size / N`` samples of its shard per step and DDP averages the gradients, so a step
is the step of one process on the union batch (exactly so for models without batch norm;
batch-norm statistics are per process, as in plain DDP -- no SyncBatchNorm), the number of
steps per epoch and the learning-rate schedule are those of a single-process run, and
results stay comparable across launch sizes. ``batch_size`` must divide by N.

Rank 0 alone writes files (training checkpoints, ``plan.json``, ``model.pt``,
``metrics.json``) and logs to MLflow; what it finds on disk before a run (a finished run, a
run to resume, stale state to discard) it decides alone and tells every rank
(:func:`agree`), so no rank trains a run that rank 0 found finished or reads a checkpoint rank
0 is discarding. A method that cannot run distributed declares ``distributed = False`` and a
distributed launch of it is refused before any work (:func:`check_launch`).

Devices (:func:`use_device`, the config's ``device``): each process trains on
``cuda:<LOCAL_RANK>`` when the run's device is CUDA, else on the CPU. The training group's
backend follows the model: nccl for a model on a GPU (DDP wraps it with
``device_ids=[local_rank]``), gloo on the CPU; :func:`all_sum` reduces on the backend's device.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.base.registry import METHODS
from jpqbench.nn.layers import module_device

T = TypeVar("T")


def world_size() -> int:
    """Processes in this launch (torchrun's ``WORLD_SIZE``; 1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(setting: str, processes_per_node: int | None = None) -> torch.device:
    """The device a process of this launch trains on, for the config's ``device`` setting.

    ``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU, or more
    processes on a node than it has GPUs, is refused naming the fix. Under torchrun the
    process uses ``cuda:<LOCAL_RANK>``. ``processes_per_node``: checked before a launch
    (``--nproc``); default: this process's own index must have a GPU.
    """
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("the config asks for device: cuda, but torch sees no CUDA GPU on this machine "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                        "set `device: cpu` (or `auto`) in the config, or run on a machine with a GPU and a "
                        "CUDA build of torch")
    gpus = torch.cuda.device_count()
    needed = processes_per_node if processes_per_node is not None else local_rank() + 1
    if needed > gpus:
        raise UserError(f"{needed} processes on this node need one GPU each, but it has {gpus}",
                        f"launch at most {gpus} processes per node (--nproc / --nproc-per-node), or set "
                        "`device: cpu`")
    return torch.device("cuda", local_rank())


def use_device(setting: str) -> torch.device:
    """:func:`resolve_device`, made this process's current CUDA device (nccl and any allocation
    without an explicit index then go to the process's own GPU)."""
    device = resolve_device(setting)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def describe_device(device: torch.device) -> str:
    """What ``metrics.json`` and MLflow record: ``cpu`` or e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type != "cuda":
        return device.type
    return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a distributed one: the one that writes."""
    return rank() == 0


def check_launch(method_name: str, distributed: bool, batch_size: int, processes: int | None = None) -> None:
    """Refuse a distributed launch that cannot run, naming why (before any work is done).

    ``distributed``: the method's :attr:`~jpqbench.harness.method.Method.distributed`."""
    processes = processes or world_size()
    if processes <= 1:
        return
    if not distributed:
        raise UserError(f"method {method_name!r} runs in a single process only (its search or projection is "
                        f"global, see {METHODS.file_of(method_name.partition('[')[0])}) but {processes} processes "
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
    inside a process group that lives as long as the block (nccl for a model on a GPU, with
    ``device_ids=[its GPU]``; gloo on the CPU).

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
    device = module_device(model)
    cuda = device.type == "cuda"
    with _process_group("nccl" if cuda else "gloo"):
        yield nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                  find_unused_parameters=True)
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        dist.barrier(device_ids=[device.index] if cuda else None)


_store: dist.Store | None = None  # this process's connection to the launch's key-value store
_generation = 0  # process groups made so far: the same sequence on every rank


@contextmanager
def _process_group(backend: str) -> Iterator[None]:
    """A process group for the block, its keys under a prefix of its own in the launch's store.

    A run makes several groups one after the other (the saved-state check, each training
    phase); torchrun's store outlives them all, and a default group reuses its name (and so its
    store keys) each time it is re-created -- a rank could read the address another rank
    published for an earlier group and hang or fail connecting to it. One store connection per
    process and a fresh prefix per group keep the groups apart.
    """
    global _store, _generation
    if dist.is_initialized():
        raise RuntimeError("a process group is already active: training phases and saved-state checks cannot nest")
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://"))
    _generation += 1
    dist.init_process_group(backend, store=dist.PrefixStore(f"jpqbench/{_generation}", _store), rank=rank(),
                            world_size=world_size())
    try:
        yield
    finally:
        dist.destroy_process_group()


def agree(decide: Callable[[], T]) -> T:
    """``decide()`` run by rank 0 alone, its result returned on every rank.

    For what rank 0 finds on disk and acts on before a run (finished? resumable? stale state to
    discard?): the other ranks wait for it (a barrier) and take its decision, so none trains a
    run rank 0 found finished or reads a checkpoint rank 0 is deleting. A failure in rank 0's
    ``decide`` is raised on every rank, not left as a hang. The result must pickle.
    """
    if world_size() <= 1:
        return decide()
    failure: BaseException | None = None
    outcome: list[object] = [None]
    with _process_group("gloo"):  # objects on the CPU, whatever the training backend
        if is_main_process():
            try:
                outcome = [("ok", decide())]
            except BaseException as error:  # SIGTERM included: every rank stops
                failure = error
                outcome = [("user", (error.problem, error.fix)) if isinstance(error, UserError)
                           else ("failed", f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(outcome, src=0)
        dist.barrier()  # every rank has the outcome before the group goes
    if failure is not None:
        raise failure
    status, value = outcome[0]
    if status == "user":
        raise UserError(*value)
    if status == "failed":
        raise RuntimeError(f"rank 0 failed while checking the run's saved state ({value})")
    return value


def check_ranks_agree(model: nn.Module, plan_layers: dict) -> None:
    """Raise on every rank unless every rank ends a method with the same model and per-layer plan.

    A distributed run lets rank 0 alone evaluate, count and write the result, on the promise
    that the ranks' models are identical (:func:`training_group`). A method that decides
    something from rank-specific data inside a training phase (a statistic or a mask taken
    from the rank's own batches and not reduced over the ranks) breaks that promise silently;
    this makes it a failed run. Compares a digest of every tensor of the state (bit for bit) and
    of the plan's layers (JSON).
    """
    if world_size() <= 1:
        return
    digest = hashlib.sha256(json.dumps(plan_layers, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[str | None] = [None] * world_size()
    with _process_group("gloo"):
        dist.all_gather_object(digests, digest.hexdigest())
    differing = [index for index, value in enumerate(digests) if value != digests[0]]
    if differing:
        raise RuntimeError(f"the ranks ended the method with different models or plans (ranks {differing} differ "
                           "from rank 0): the method decides something from a rank's own batches without "
                           "reducing it over the ranks, so it cannot run distributed as it is; run it in one "
                           "process, or reduce that statistic with jpqbench.harness.distributed")


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks in place (inside :func:`training_group`; on the model's
    device), returned; unchanged in one process. For statistics a rank gathers from its own
    share of the batches that decide something every rank must decide alike."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: torch.Tensor) -> bool:
    """Whether the boolean ``flag`` (a 0-dim tensor on the model's device) is set on any rank:
    a divergence stops all ranks at the same step (a rank stopping alone would leave the others
    waiting in the gradient all-reduce). Reading it waits for the device: call it where the
    loop may synchronise."""
    if not dist.is_initialized():
        return bool(flag)
    return bool(all_sum_(flag.to(_collective_device(), torch.int64).reshape(1))[0])


def worker_grace_s() -> int:
    """How long torchrun gives its workers to unwind after a SIGTERM before it SIGKILLs them
    (its ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30 s)."""
    return int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


def launch(processes: int, argv: list[str]) -> int:
    """Run ``jpqbench <argv>`` in ``processes`` local processes under torchrun; its exit code.

    ``--standalone`` picks a free local rendezvous port. For several nodes call torchrun
    yourself (``--nnodes``, ``--rdzv-endpoint``) with ``-m jpqbench.pipeline.cli``.

    Interrupted (SIGTERM, which the CLI raises as SystemExit, or Ctrl-C), the launcher stops
    torchrun before it unwinds: torchrun forwards SIGTERM to its workers (each closes its run
    as interrupted; a rerun resumes it), waits :func:`worker_grace_s` for them and SIGKILLs the
    rest. torchrun itself is killed only if it outlives that by 30 s -- its workers run in
    sessions of their own, so killing torchrun first (what ``subprocess.run`` does) would
    orphan them.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "jpqbench.pipeline.cli", *argv]
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except BaseException:
        _stop(process)
        raise


def _stop(torchrun: subprocess.Popen) -> None:
    """SIGTERM to torchrun, a bounded wait for it and its workers, then SIGKILL. Further SIGTERMs
    are ignored meanwhile: the shutdown already under way is the one they ask for."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if torchrun.poll() is None:
            torchrun.send_signal(signal.SIGTERM)
        try:
            torchrun.wait(timeout=worker_grace_s() + 30)
        except subprocess.TimeoutExpired:
            torchrun.kill()
            torchrun.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
