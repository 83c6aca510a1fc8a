"""The shared training loop: every method trains through it, so every method gets the same
optimizer, schedule, data order, checkpointing and accounting.

* SGD (momentum) or Adam, cosine learning-rate decay per step, no weight decay on 1-D
  parameters (BN, biases, quantizer steps);
* the data order of epoch ``e`` depends only on (seed, phase, e), so a resumed run sees the
  same batches as an uninterrupted one;
* validation accuracy every ``eval_every`` epochs and at the end (per-epoch evaluation of a
  tiny model costs as much as a twentieth of its training);
* a checkpoint (model, optimizer, scheduler, RNG, elapsed times, history) is written
  atomically at the end of every epoch; :func:`fit` resumes from it when it exists, and a
  finished phase is skipped on rerun; a checkpoint that cannot be resumed from (unreadable,
  or the state of another model or optimizer) is refused with a UserError, never half-used;
* methods customise training through :class:`TrainHooks` -- extra loss terms, post-step
  projections, per-epoch phase changes, their own optimizer parameter groups, or (a method
  that is an optimizer) their own optimizer;
* ``compute_s`` accumulates the time spent in forward, backward, optimizer step and hooks
  -- the work itself -- so the harness overhead of a run (everything else) is measurable. On a
  GPU it is measured with CUDA events around each step and read at the epoch's end (the host's
  clock around asynchronous launches would time the launches, not the work), and the epoch's
  wall time is read after the GPU has finished, so the figures mean the same on every device;
* a step never makes the host wait for the device: the loss and accuracy sums stay on the
  device and are read once per epoch; a non-finite loss is flagged on the device and the flag
  is read every :data:`DIVERGENCE_CHECK_STEPS` steps on a GPU (every step on the CPU, where
  reading costs nothing) and at the epoch's end -- the same steps on every rank, so a
  divergence stops them all at one point and the run is recorded as ``diverged``;
* ``precision: bf16`` runs the forward pass and the loss under autocast (weights, gradients,
  optimizer state and BN statistics stay FP32); ``channels_last`` stores conv weights and 4-D
  inputs channels-last. Both are for FP32 pretraining on GPUs; the defaults (fp32, contiguous)
  leave the loop exactly as it was. Validation always evaluates in FP32;
* the model trains on the data's device (:attr:`jpqbench.harness.data.DataBundle.device`, the run's):
  :func:`fit` moves it there first (the same parameter objects, so hooks and parameter groups
  made before stay valid). Checkpoints load onto the CPU and are copied into the model, so a
  run resumes on any device; on CUDA the GPU's random state is saved and restored too.
"""
from __future__ import annotations

import contextlib
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from jpqbench.base import atomic
from jpqbench.base.errors import UserError
from jpqbench.harness.data import DataBundle
from jpqbench.harness.distributed import all_sum_, any_rank, is_main_process, shard_steps, training_group
from jpqbench.harness.evaluate import evaluate


class TrainHooks:
    """Override what a method needs; the defaults do nothing."""

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return default_param_groups(model, weight_decay)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Phase changes (freeze bits, switch a quantizer on, anneal a temperature)."""

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """A term added to the task loss (regularisers, budget penalties)."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Runs after every optimizer step (projections, mask re-application)."""

    def make_optimizer(self, groups: list[dict[str, Any]], spec: TrainSpec) -> torch.optim.Optimizer | None:
        """A method's own optimizer over ``groups`` (from :meth:`param_groups`), for a method whose
        algorithm *is* an optimizer (GETA's QASSO); None (the default) is the harness's SGD/Adam.

        It takes every step in place of the harness's optimizer and must read each group's
        ``lr`` at every step: the harness's cosine schedule sets it, and its ``state_dict`` is
        what the checkpoint saves and a resumed run restores.
        """
        return None


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


DIVERGENCE_CHECK_STEPS = 50  # on a GPU: steps between reads of the non-finite-loss flag


@dataclass
class TrainSpec:
    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps_per_epoch: int | None = None
    eval_every: int = 1
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    channels_last: bool = False


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    compute_s: float = 0.0
    wall_s: float = 0.0


def _make_optimizer(groups: list[dict[str, Any]], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0)
    return torch.optim.Adam(groups, lr=spec.lr)


def _epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(phase.encode()) + epoch)


def _compute_context(spec: TrainSpec, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What the forward pass and the loss run under: bf16 autocast on the run's device, or nothing."""
    if spec.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _layout(inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last and inputs.dim() == 4 else inputs


class ComputeClock:
    """The time spent in the marked parts of a loop (:meth:`start` .. :meth:`stop`): the host's
    clock on the CPU; CUDA events on a GPU, whose launches return before the work is done. The
    events are read by :meth:`seconds`, which waits for the GPU: call it at a phase boundary."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self.spans: list[tuple[Any, Any]] = []
        self._tick: Any = None

    def start(self) -> None:
        if self.cuda:
            self._tick = torch.cuda.Event(enable_timing=True)
            self._tick.record()
        else:
            self._tick = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            tock = torch.cuda.Event(enable_timing=True)
            tock.record()
            self.spans.append((self._tick, tock))
        else:
            self.host_s += time.perf_counter() - self._tick

    def seconds(self) -> float:
        """The marked time since the last call."""
        if self.cuda:
            torch.cuda.synchronize()
            self.host_s += sum(start.elapsed_time(end) for start, end in self.spans) / 1000
            self.spans.clear()
        seconds, self.host_s = self.host_s, 0.0
        return seconds


def fit(model: nn.Module, data: DataBundle, spec: TrainSpec, *, seed: int, phase: str,
        checkpoint: Path | None = None, hooks: TrainHooks | None = None,
        log: Callable[[dict[str, float], int], None] | None = None) -> TrainResult:
    """Train ``model`` for ``spec.epochs`` epochs; resume from ``checkpoint`` if present."""
    hooks = hooks or TrainHooks()
    model.to(data.device)
    if spec.channels_last:  # in place: parameter objects (and the groups made from them) stay the same
        model.to(memory_format=torch.channels_last)
    compute_context = _compute_context(spec, data.device)
    cuda = data.device if data.device.type == "cuda" else None
    groups = hooks.param_groups(model, spec.lr, spec.weight_decay)
    optimizer = hooks.make_optimizer(groups, spec)
    if optimizer is None:
        optimizer = _make_optimizer(groups, spec)
    # under torchrun: batch_size is the global batch, split over the processes (jpqbench.harness.distributed)
    batch_size, steps_per_epoch = shard_steps(len(data.train), spec.batch_size)
    if spec.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, spec.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, spec.epochs * steps_per_epoch))
    result, start_epoch = TrainResult(), 0
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, weights_only=False, map_location="cpu")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])  # moves the optimizer state to the parameters' device
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if cuda is not None and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], cuda)
            result = TrainResult(state["history"], state["compute_s"], state["wall_s"])
            start_epoch = state["epoch"] + 1
        except Exception as error:  # noqa: BLE001 -- truncated, foreign or malformed: one problem for the user
            raise UserError(f"training checkpoint {checkpoint} cannot be resumed from "
                            f"({type(error).__name__}: {str(error)[:300]})",
                            f"delete {checkpoint.parent} to restart the run from the beginning") from None
    progress = tqdm(range(start_epoch, spec.epochs), desc=phase, leave=False,
                    disable=not sys.stderr.isatty(), initial=start_epoch, total=spec.epochs)
    device = data.device
    check_every = 1 if device.type == "cpu" else DIVERGENCE_CHECK_STEPS
    clock = ComputeClock(device)
    with training_group(model) as trained:
        for epoch in progress:
            wall_start = time.perf_counter()
            model.train()
            hooks.on_epoch_start(model, epoch)
            # loss sum, correct and seen, summed on the device (float64: a sum of per-batch means x sizes)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            non_finite = torch.zeros((), dtype=torch.bool, device=device)
            step = epoch * steps_per_epoch
            loader = data.loader("train", batch_size, shuffle=True, generator=_epoch_generator(seed, phase, epoch))
            steps = min(len(loader), steps_per_epoch)
            for batch_index, (inputs, targets) in enumerate(loader):
                if batch_index >= steps:
                    break
                clock.start()
                with compute_context():
                    logits = trained(_layout(inputs, spec.channels_last))
                    loss = F.cross_entropy(logits, targets)
                extra = hooks.extra_loss(model, step)
                total = loss if extra is None else loss + extra
                non_finite |= ~torch.isfinite(total.detach())
                if (batch_index + 1) % check_every == 0 or batch_index + 1 == steps:
                    if any_rank(non_finite):  # the same steps on every rank: all stop at this one
                        where = f"in phase {phase!r}, epoch {epoch}"
                        if check_every == 1:
                            raise FloatingPointError(f"loss became {total.item()} {where}, step {step}")
                        raise FloatingPointError(f"loss became non-finite {where}, at one of steps "
                                                 f"{step - batch_index % check_every}..{step}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                hooks.after_step(model, step)
                clock.stop()
                sums[0] += loss.detach().double() * len(targets)
                sums[1] += (logits.detach().argmax(1) == targets).sum()
                sums[2] += len(targets)
                step += 1
            loss_sum, correct, seen = all_sum_(sums).tolist()  # over every rank's shard; the epoch's one read
            result.compute_s += clock.seconds()
            record = {"epoch": epoch, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                      "lr": scheduler.get_last_lr()[0]}
            if (epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs:
                record["val_top1"] = evaluate(model, data, "val", spec.batch_size)["top1"]
            result.history.append(record)
            result.wall_s += time.perf_counter() - wall_start
            if log is not None:
                log({f"{phase}/{k}": v for k, v in record.items() if k != "epoch"}, epoch)
            if checkpoint is not None and is_main_process():
                atomic.torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
                                   "history": result.history, "compute_s": result.compute_s, "wall_s": result.wall_s,
                                   **({"cuda_rng": torch.cuda.get_rng_state(cuda)} if cuda is not None else {})},
                                  checkpoint)
            progress.set_postfix(loss=f"{record['train_loss']:.3f}", train_top1=f"{record['train_top1']:.3f}")
    return result
