"""Training throughput of the harness's loop against a plain PyTorch loop, on one device.

    python benchmarks/throughput.py [--device cpu|cuda] [--models cifar10/resnet8 cifar10/resnet20 imagenet/resnet18]
        [--batch-size N] [--warmup N] [--steps N] [--repeats 3] [--workers 0 1 2] [--train-workers N]
        [--threads N] [--json OUT]

For each (dataset, model) it prints, and writes to ``--json``:

* **harness** img/s: :func:`jpqbench.train.fit` on the dataset plugin's bundle, moved with
  ``DataBundle.to(device)`` -- the loop every method trains through (its loader, per-batch
  augmentation seeding, device-side loss/accuracy sums, divergence flag, compute clock, hooks);
* **plain** img/s: the loop an expert writes for the same model (same initial weights), batch
  size, optimizer, learning-rate schedule and device, with nothing else in it (no reads of the
  device per step; on CUDA the only synchronisations are the two that bound the timing);
* their ratio, harness / plain;
* for ImageNet, the loader alone: img/s of ``bundle.loader("train", ...)`` with each
  ``--workers`` count of loader worker processes.

The data. CIFAR-10: a fixture in torchvision's ``cifar-10-batches-py`` format (5 pickled
batches of random uint8 images, as many as the timed steps need), loaded by the cifar10 plugin
(its uint8 ``TensorSplit`` with batched crop+flip augmentation). The plain loop holds the same
uint8 images in one tensor on the device, indexes a random permutation batch by batch, and
augments with :func:`jpqbench.augment.random_crop_flip` + normalisation -- the harness's own
batched augmentation, reused so that the comparison measures the loop, not two augmentation
kernels. ImageNet: an ImageFolder tree (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) of
500x375 JPEGs, decoded per sample by the imagenet plugin's ``ImageFiles`` (RandomResizedCrop(224)
+ flip). The plain loop reads the same ``ImageFiles`` through a plain ``DataLoader`` with the
same worker count, prefetching and pinned memory, so the comparison measures the harness's
loader wrapper (its batch sampler, per-batch seeding) and loop, not JPEG decoding.

The recipe. Batch size, optimizer (SGD with Nesterov momentum, or Adam), learning rate, momentum
and weight decay are the pretraining recipe of ``config/paper.yaml`` for the (dataset, model),
as the figures feed ``jpqbench estimate --throughput``, which counts samples at the recipe's batch
size; both loops exclude 1-D parameters from weight decay and decay the learning rate with a
cosine per step, as the harness does. On the CPU, ResNet-18 trains at batch :data:`CPU_BATCH`
(the recipe's 256 takes about 12 s a step on 2 cores). ``--batch-size`` overrides all.

The timing. Each loop runs ``warmup + steps`` steps in one epoch (the fixture is sized so
that one epoch holds them) and the clock is read right after the optimizer step of step
``warmup - 1`` and of the last step -- in the harness through a :class:`TrainHooks`
``after_step``, in the plain loop at the same point -- so the timed span is exactly ``steps``
full iterations: data preparation, forward, backward, optimizer and scheduler steps and each
loop's own bookkeeping. Outside it: start-up (model move, optimizer, loader worker start,
first-step allocations, cuDNN's first calls) and the validation pass that ``fit`` makes after
its last step (the fixtures' val splits are small anyway). On CUDA both reads synchronise first.

Fairness on a noisy machine. Torch's thread count is set (``--threads``, default: the CPUs this
process may use); loader workers run one thread each (DataLoader's default). The variants of a
benchmark are measured ``--repeats`` times, interleaved, each repeat in a rotated order, and
each figure is the median of its repeats; a ratio is the median of the repeats' ratios, each
from two measurements made back to back, so slow drifts of the machine's load cancel.

Determinism. A CUDA run of the harness asks torch for deterministic kernels
(``jpqbench.runner.seed_everything``), which an expert's loop would not do. On CUDA the harness
is therefore measured twice: as a run trains (``harness``, deterministic kernels: its img/s is
what ``img_per_s`` reports) and with torch's defaults (``harness_loop``, the loop alone). On the
CPU the switch changes nothing and only ``harness`` is measured.

JSON: ``{"device": ..., "img_per_s": {"<dataset>/<model>": harness img/s, ...}, "plain_img_per_s":
{...}, "ratio": {...}, "loader_img_per_s": {"imagenet": {"<workers>": img/s}}, "runs": {...}}`` --
``device`` and ``img_per_s`` are what ``jpqbench estimate --throughput`` reads. Results go to
``benchmarks/results.md`` by hand, with the command that produced them.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jpqbench.augment import random_crop_flip
from jpqbench.config import TrainRecipe, load_config
from jpqbench.data import DataBundle
from jpqbench.distributed import describe_device, resolve_device
from jpqbench.registry import DATASETS, MODELS
from jpqbench.train import TrainHooks, TrainSpec, default_param_groups, fit

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"
BENCHMARKS = ("cifar10/resnet8", "cifar10/resnet20", "imagenet/resnet18")
# (warmup, timed) steps per repeat: a few seconds a measurement on each device
STEPS = {
    "cpu": {"cifar10/resnet8": (10, 150), "cifar10/resnet20": (3, 25), "imagenet/resnet18": (2, 6)},
    "cuda": {"cifar10/resnet8": (50, 400), "cifar10/resnet20": (30, 300), "imagenet/resnet18": (5, 20)},
}
CPU_BATCH = {"imagenet/resnet18": 16}
LOADER_BATCHES = 5  # timed batches of a loader-only measurement, after one untimed batch
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # datasets/cifar10.py's normalisation
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_PADDING = 4
CIFAR_BATCH_FILES = 5
CIFAR_VAL_SHARE = 0.1  # of the training batches, held out by the plugin as val
IMAGENET_CLASSES = 4
IMAGENET_VAL_PER_CLASS = 10  # training images per class the plugin holds out as val
JPEG_SIZE = (500, 375)  # ImageNet's typical width x height
JPEG_VARIANTS = 16  # distinct JPEGs; the fixture's files repeat them (decoding costs the same)


@dataclass
class Timing:
    """One measurement of a loop: its throughput, and evidence that it trained."""

    img_per_s: float
    loss: float  # the harness's epoch-mean training loss; the plain loop's last step's
    weight_change: float  # the largest change of any weight over the run: > 0 when the loop trained


@dataclass
class Benchmark:
    """One (dataset, model) as measured: its recipe at the measured batch size, and step counts."""

    name: str
    recipe: TrainRecipe
    warmup: int
    steps: int

    @property
    def dataset(self) -> str:
        return self.name.split("/")[0]

    @property
    def images_needed(self) -> int:
        """Training images one epoch must hold for every step to be a full batch."""
        return (self.warmup + self.steps) * self.recipe.batch_size


class StepClock(TrainHooks):
    """Reads the clock after the optimizer step of step ``warmup - 1`` and of step ``warmup + steps - 1``
    (a harness hook; the plain loop calls it at the same point). On CUDA it waits for the GPU first."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device = device
        self.marks = {warmup - 1: math.nan, warmup + steps - 1: math.nan}
        self.steps = steps

    def after_step(self, model: nn.Module, step: int) -> None:
        if step in self.marks:
            self.marks[step] = now(self.device)

    def seconds(self) -> float:
        start, end = self.marks.values()
        if math.isnan(end):
            raise RuntimeError(f"the loop stopped before its last timed step ({max(self.marks)})")
        return end - start


def now(device: torch.device) -> float:
    """The host's clock once ``device`` has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------- fixtures
def write_cifar10_fixture(root: Path, per_batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/cifar-10-batches-py`` as torchvision reads it (pickled {data: uint8 (N, 3072), labels}),
    ``per_batch`` random images in each training batch and a small test batch; returns the
    training images (uint8 (N, 3, 32, 32)) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for name, count in [*((f"data_batch_{i}", per_batch) for i in range(1, CIFAR_BATCH_FILES + 1)),
                        ("test_batch", 100)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        targets = [int(label) for label in rng.integers(0, 10, count)]
        entry = {"batch_label": name, "data": data, "labels": targets,
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        if name != "test_batch":
            images.append(data)
            labels += targets
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32), torch.tensor(labels)


def jpeg_variants(rng: np.random.Generator) -> list[bytes]:
    """:data:`JPEG_VARIANTS` encoded photo-like images: smooth colour fields plus grain (pure noise
    would decode slower than photographs, a flat image faster)."""
    width, height = JPEG_SIZE
    encoded = []
    for _ in range(JPEG_VARIANTS):
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(JPEG_SIZE,
                                                                                           Image.BICUBIC)
        grain = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_imagenet_fixture(root: Path, train_per_class: int, rng: np.random.Generator) -> None:
    """An ImageFolder tree: ``train/<wnid>/`` with ``train_per_class`` JPEGs per class and
    ``val/<wnid>/`` with one, for :data:`IMAGENET_CLASSES` classes."""
    variants = jpeg_variants(rng)
    number = 0
    for index in range(IMAGENET_CLASSES):
        wnid = f"n{1440764 + index:08d}"
        for split, count in (("train", train_per_class), ("val", 1)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for _ in range(count):
                (folder / f"{wnid}_{number:06d}.JPEG").write_bytes(variants[number % JPEG_VARIANTS])
                number += 1


def placed(bundle: DataBundle, device: torch.device, workers: int = 0) -> DataBundle:
    """``bundle`` delivering its batches on ``device`` (its in-memory splits moved there), files
    read by ``workers`` loader processes. The harness before issue 18 had neither
    ``DataBundle.to`` nor ``workers`` (results.md's "before" runs this script against it): there
    the bundle's device is set as its runner set it, and only 0 workers exist."""
    if hasattr(bundle, "to"):
        return dataclasses.replace(bundle, workers=workers).to(device)
    if workers:
        raise SystemExit("this jpqbench has no loader workers: pass --workers 0 --train-workers 0")
    return dataclasses.replace(bundle, device=device)


# ---------------------------------------------------------------- the loops
def build_model(benchmark: Benchmark, device: torch.device) -> nn.Module:
    """The benchmark's model for the real dataset's classes, from the same initial weights every time."""
    plugin = DATASETS.get(benchmark.dataset)
    torch.manual_seed(0)
    return MODELS.get(benchmark.recipe.model)(plugin.num_classes, plugin.input_shape).to(device)


def measured(model: nn.Module, train: Callable[[StepClock], float], clock: StepClock) -> Timing:
    """Run ``train`` (which returns its loss) and time it with ``clock``."""
    start = [param.detach().clone() for param in model.parameters()]
    loss = train(clock)
    change = max(float((param.detach() - first).abs().max()) for param, first in zip(model.parameters(), start))
    return Timing(clock.steps * model_batch(clock) / clock.seconds(), loss, change)


def model_batch(clock: StepClock) -> int:
    return clock.batch_size


def harness_timing(model: nn.Module, bundle: DataBundle, benchmark: Benchmark, deterministic: bool) -> Timing:
    """``fit`` for one epoch of ``warmup + steps`` steps; with ``deterministic`` as a CUDA run sets torch."""
    recipe = benchmark.recipe
    spec = TrainSpec(epochs=1, lr=recipe.lr, batch_size=recipe.batch_size, optimizer=recipe.optimizer,
                     momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                     max_steps_per_epoch=benchmark.warmup + benchmark.steps)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    clock = StepClock(bundle.device, benchmark.warmup, benchmark.steps)

    def train(hooks: StepClock) -> float:
        return fit(model, bundle, spec, seed=0, phase="throughput", hooks=hooks).history[-1]["train_loss"]

    return measured(model, train, clock)
