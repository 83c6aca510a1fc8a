"""Training throughput of the harness's loop against a plain PyTorch loop, on one device.

    python benchmarks/throughput.py [--device cpu|cuda] [--models cifar10/resnet8 cifar10/resnet20 imagenet/resnet18]
        [--batch-size N] [--warmup N] [--steps N] [--repeats 5] [--workers 0 1 2] [--train-workers N]
        [--threads N] [--json OUT]

For each (dataset, model) it prints, and writes to ``--json``:

* **harness** img/s: :func:`jpqbench.harness.train.fit` on the dataset plugin's bundle, moved with
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
augments and normalises with :class:`jpqbench.harness.augment.ImageBatches` at the plugin's settings --
the harness's own batched augmentation, reused so that the comparison measures the loop, not two
augmentation kernels. ImageNet: an ImageFolder tree (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) of
500x375 JPEGs, decoded per sample by the imagenet plugin's ``ImageFiles`` (RandomResizedCrop(224)
+ flip). The plain loop reads the same ``ImageFiles`` through a plain ``DataLoader`` with the
same worker count (``--train-workers``), prefetching and pinned memory, so the comparison
measures the harness's loader wrapper (its batch sampler, per-batch seeding) and loop, not
JPEG decoding. Every measurement that reads files starts its loader workers (in its untimed
warm-up) and ends them: workers left behind would go on decoding their prefetched batches
inside the next measurement.

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
On the CPU the clock is also read after every step between them, and a second, robust figure
is reported: img/s at the median step, which a burst of other load on a shared machine
hardly moves -- but which is also blind to a cost that comes in a few steps only (a loader
stall, a garbage collection), so the span's figure stays the one that counts.

Fairness on a noisy machine. Torch's thread count is set (``--threads``, default: the CPUs this
process may use); loader workers run one thread each (DataLoader's default). The variants of a
benchmark (and the loader's worker counts) are measured ``--repeats`` times, interleaved, each
repeat in a rotated order, and each figure is the median of its repeats; a ratio is the median
of the repeats' ratios, each from two measurements of the same repeat, so slow drifts of the
machine's load cancel.

Determinism. A CUDA run of the harness asks torch for deterministic kernels and cuBLAS for its
deterministic workspace (``jpqbench.pipeline.runner.seed_everything``), which an expert's loop would not
do; the workspace setting holds for the whole process, the kernels' switch is set per variant. On CUDA the harness
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

from jpqbench.base.config import TrainRecipe, load_config
from jpqbench.base.registry import DATASETS, MODELS
from jpqbench.harness.augment import ImageBatches
from jpqbench.harness.data import DataBundle
from jpqbench.harness.distributed import describe_device, resolve_device
from jpqbench.harness.train import TrainHooks, TrainSpec, default_param_groups, fit

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"
BENCHMARKS = ("cifar10/resnet8", "cifar10/resnet20", "imagenet/resnet18")
# (warmup, timed) steps per repeat: 1-4 s a measurement on each device (many short repeats
# resist bursts of other load on a shared CPU better than a few long ones)
STEPS = {
    "cpu": {"cifar10/resnet8": (10, 80), "cifar10/resnet20": (3, 12), "imagenet/resnet18": (2, 4)},
    "cuda": {"cifar10/resnet8": (50, 400), "cifar10/resnet20": (30, 300), "imagenet/resnet18": (5, 20)},
}
CPU_BATCH = {"imagenet/resnet18": 16}
LOADER_BATCHES = 5  # timed batches of a loader-only measurement, after one untimed batch
CIFAR_BATCH_FILES = 5
IMAGENET_CLASSES = 4
IMAGENET_VAL_PER_CLASS = 10  # training images per class the plugin holds out as val
JPEG_SIZE = (500, 375)  # ImageNet's typical width x height
JPEG_VARIANTS = 16  # distinct JPEGs; the fixture's files repeat them (decoding costs the same)


@dataclass
class Timing:
    """One measurement: its throughput and, of a training loop, evidence that it trained."""

    img_per_s: float
    loss: float | None = None  # the harness's epoch-mean training loss; the plain loop's last step's
    weight_change: float | None = None  # the largest change of any weight over the run: > 0 when it trained
    median_step_img_per_s: float | None = None  # from the median step's time (CPU)


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
    """Reads the clock after the optimizer steps of steps ``warmup - 1`` to ``warmup + steps - 1``: a
    harness hook, which the plain loop calls at the same point. On the CPU after each of them (a
    read costs a fraction of a microsecond); on CUDA, where a read first waits for the GPU, after
    the first and the last only."""

    def __init__(self, device: torch.device, benchmark: Benchmark) -> None:
        self.device = device
        self.batch_size = benchmark.recipe.batch_size
        self.first, self.last = benchmark.warmup - 1, benchmark.warmup + benchmark.steps - 1
        self.every_step = device.type == "cpu"
        self.times: list[float] = []

    def after_step(self, model: nn.Module, step: int) -> None:
        if step in (self.first, self.last) or (self.every_step and self.first < step < self.last):
            self.times.append(now(self.device))

    def timing(self, loss: float, weight_change: float) -> Timing:
        """img/s over the timed span and, on the CPU, at its median step."""
        if len(self.times) < 2:
            raise RuntimeError(f"the loop stopped before its last timed step ({self.last})")
        span = self.times[-1] - self.times[0]
        median_step = statistics.median(np.diff(self.times)) if self.every_step else None
        return Timing(self.batch_size * (self.last - self.first) / span, loss, weight_change,
                      None if median_step is None else self.batch_size / median_step)


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
    decodes slower than a photograph, a flat image faster)."""
    width, height = JPEG_SIZE
    encoded = []
    for _ in range(JPEG_VARIANTS):
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(JPEG_SIZE, Image.BICUBIC)
        grain = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_imagenet_fixture(root: Path, train_per_class: int, rng: np.random.Generator) -> None:
    """An ImageFolder tree of :data:`IMAGENET_CLASSES` classes: ``train/<wnid>/`` with
    ``train_per_class`` JPEGs each, ``val/<wnid>/`` with one."""
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
    """``bundle`` delivering its batches on ``device`` (its in-memory splits moved there), its files
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
    """``train(clock)`` (which returns its loss) timed by ``clock``, with the largest weight change it made."""
    start = [param.detach().clone() for param in model.parameters()]
    loss = train(clock)
    change = max(float((param.detach() - first).abs().max()) for param, first in zip(model.parameters(), start))
    return clock.timing(loss, change)


def harness_timing(benchmark: Benchmark, bundle: DataBundle, deterministic: bool) -> Timing:
    """``fit`` for one epoch of ``warmup + steps`` steps; ``deterministic``: torch set as a CUDA run sets it."""
    recipe = benchmark.recipe
    spec = TrainSpec(epochs=1, lr=recipe.lr, batch_size=recipe.batch_size, optimizer=recipe.optimizer,
                     momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                     max_steps_per_epoch=benchmark.warmup + benchmark.steps)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    model = build_model(benchmark, bundle.device)

    def train(clock: StepClock) -> float:
        return fit(model, bundle, spec, seed=0, phase="throughput", hooks=clock).history[-1]["train_loss"]

    return measured(model, train, StepClock(bundle.device, benchmark))


def plain_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """The recipe's optimizer, without weight decay on 1-D parameters (BN, biases)."""
    groups = default_param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    return torch.optim.Adam(groups, lr=recipe.lr)


def plain_timing(benchmark: Benchmark, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> Timing:
    """The expert's loop over ``batches`` (already on ``device``) for ``warmup + steps`` steps."""
    torch.use_deterministic_algorithms(False)
    model = build_model(benchmark, device)
    total = benchmark.warmup + benchmark.steps

    def train(clock: StepClock) -> float:
        optimizer = plain_optimizer(model, benchmark.recipe)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        model.train()
        for step, (inputs, targets) in zip(range(total), batches):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clock.after_step(model, step)
        return float(loss.detach())

    return measured(model, train, StepClock(device, benchmark))


def _cifar10_plugin():
    """jpqbench/datasets/cifar10.py as the registry loaded it (plugins are loaded by path, not importable by name)."""
    return sys.modules[DATASETS.get("cifar10").__module__]


def tensor_batches(images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches of uint8 ``images`` where they live, cropped, flipped and normalised."""
    cifar = _cifar10_plugin()  # its normalisation and crop padding
    transform = ImageBatches(cifar.MEAN, cifar.STD, padding=cifar.PADDING).to(images.device)
    order = torch.randperm(len(targets), generator=generator).to(images.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield transform(images[index]), targets[index]


def file_batches(dataset: Dataset, batch_size: int, workers: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of ``dataset`` from a plain DataLoader (``workers`` processes, the harness's
    prefetch depth, pinned memory on a GPU), on ``device``."""
    options = {}
    if workers:
        from jpqbench.harness.data import PREFETCH_BATCHES  # a harness with workers has it

        options = {"num_workers": workers, "prefetch_factor": PREFETCH_BATCHES}
    loader = DataLoader(dataset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                        pin_memory=device.type == "cuda", drop_last=True, **options)
    for inputs, targets in loader:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def interleaved(label: str, variants: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """Each variant measured ``repeats`` times; repeat ``r`` runs them in the order rotated by ``r``.
    Each measurement is logged to stderr as it ends (a CPU run takes minutes)."""
    names = list(variants)
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(variants[name]())
            print(f"{label} {name} #{repeat + 1}: {timings[name][-1].img_per_s:.1f} img/s", file=sys.stderr, flush=True)
    return timings


def loader_timed_batches(workers: int) -> int:
    """Batches timed by :func:`loader_timing`: a multiple of the worker count, as workers started
    together deliver their batches in bursts of that many."""
    return max(1, workers) * math.ceil(LOADER_BATCHES / max(1, workers))


def loader_timing(bundle: DataBundle, batch_size: int, workers: int) -> Timing:
    """img/s of ``bundle``'s training loader (``workers`` processes) alone, after its first batch,
    which starts the workers."""
    timed = loader_timed_batches(workers)
    batches = iter(bundle.loader("train", batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    next(batches)
    start = now(bundle.device)
    for _ in range(timed):
        next(batches)
    return Timing(timed * batch_size / (now(bundle.device) - start))


# ---------------------------------------------------------------- the report
def summary(benchmark: Benchmark, timings: dict[str, list[Timing]]) -> dict:
    """Medians, paired ratios against the plain loop, every repeat's figures and training evidence."""
    plain = timings["plain"]
    row = {"batch_size": benchmark.recipe.batch_size, "optimizer": benchmark.recipe.optimizer,
           "warmup": benchmark.warmup, "steps": benchmark.steps}
    for name, runs in timings.items():
        row[name] = {"img_per_s": statistics.median(t.img_per_s for t in runs),
                     "repeats": [t.img_per_s for t in runs], "loss": [t.loss for t in runs],
                     "weight_change": [t.weight_change for t in runs]}
        if runs[0].median_step_img_per_s is not None:
            row[name]["median_step_img_per_s"] = statistics.median(t.median_step_img_per_s for t in runs)
        if name != "plain":
            row[name]["ratio"] = statistics.median(t.img_per_s / p.img_per_s for t, p in zip(runs, plain))
            if runs[0].median_step_img_per_s is not None:
                row[name]["median_step_ratio"] = statistics.median(
                    t.median_step_img_per_s / p.median_step_img_per_s for t, p in zip(runs, plain))
    return row


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    rows = report["runs"].values()
    loop = any("harness_loop" in row for row in rows)
    steps = any("median_step_ratio" in row["harness"] for row in rows)
    head = ("| benchmark | batch | optimizer | timed steps | harness img/s | plain img/s | harness/plain |"
            + (" harness/plain, median step |" if steps else "")
            + (" harness_loop img/s | harness_loop/plain |" if loop else ""))
    lines = [f"device: {report['device']}, torch {report['torch']}, {report['threads']} torch threads, "
             f"{report['cpus']} CPUs, {report['repeats']} interleaved repeats (medians)", "",
             head, "|---" * (head.count("|") - 1) + "|"]
    for name, row in report["runs"].items():
        cells = [name, row["batch_size"], row["optimizer"], f"{row['steps']} (+{row['warmup']} warm-up)",
                 f"{row['harness']['img_per_s']:.1f}", f"{row['plain']['img_per_s']:.1f}",
                 f"{row['harness']['ratio']:.3f}"]
        if steps:
            cells.append(f"{row['harness']['median_step_ratio']:.3f}")
        if loop:
            cells += [f"{row['harness_loop']['img_per_s']:.1f}", f"{row['harness_loop']['ratio']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for dataset, by_workers in report["loader_img_per_s"].items():
        lines += ["", f"{dataset} loader alone (`bundle.loader(\"train\", ...)`, batch {report['loader_batch_size']}):",
                  "", "| workers | img/s | vs 0 workers |", "|---|---|---|"]
        base = by_workers.get("0")
        lines += [f"| {workers} | {rate:.1f} | {f'{rate / base:.2f}x' if base else '-'} |"
                  for workers, rate in by_workers.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def benchmarks(names: list[str], device: torch.device, args: argparse.Namespace) -> list[Benchmark]:
    """Each benchmark with paper.yaml's pretraining recipe at the measured batch size, and its step counts."""
    config = load_config(PAPER)
    chosen = []
    for name in names:
        dataset, model = name.split("/")
        batch = args.batch_size or (CPU_BATCH.get(name) if device.type == "cpu" else None)
        recipe = config.recipe(dataset, model)
        recipe = recipe.model_copy(update={"batch_size": batch or recipe.batch_size})
        warmup, steps = STEPS[device.type][name]
        chosen.append(Benchmark(name, recipe, args.warmup or warmup, args.steps or steps))
    return chosen


def measure_cifar10(group: list[Benchmark], root: Path, device: torch.device,
                    repeats: int) -> Iterator[tuple[str, dict]]:
    """The CIFAR-10 benchmarks on one fixture sized for the largest, each as it is measured."""
    needed = max(b.images_needed for b in group)
    # + 20 a file: a margin for the stratified split, which also needs 10 val images at least (one a class)
    per_batch = math.ceil(needed / ((1 - _cifar10_plugin().VAL_FRACTION) * CIFAR_BATCH_FILES)) + 20
    images, targets = write_cifar10_fixture(root, per_batch, np.random.default_rng(0))
    images, targets = images.to(device), targets.to(device)
    bundle = placed(DATASETS.get("cifar10")(verify_checksums=False).load(root), device)
    for benchmark in group:
        def plain(benchmark: Benchmark = benchmark) -> Timing:
            generator = torch.Generator().manual_seed(0)
            return plain_timing(benchmark, tensor_batches(images, targets, benchmark.recipe.batch_size, generator),
                                device)

        timings = interleaved(benchmark.name, variants(benchmark, lambda: bundle, plain, device), repeats)
        yield benchmark.name, summary(benchmark, timings)


def variants(benchmark: Benchmark, bundle: Callable[[], DataBundle], plain: Callable[[], Timing],
             device: torch.device) -> dict[str, Callable[[], Timing]]:
    """harness (as a run: deterministic kernels on CUDA) on a ``bundle()``, plain and, on CUDA,
    harness_loop (torch's defaults)."""
    cuda = device.type == "cuda"
    chosen = {"harness": lambda: harness_timing(benchmark, bundle(), deterministic=cuda), "plain": plain}
    if cuda:
        chosen["harness_loop"] = lambda: harness_timing(benchmark, bundle(), deterministic=False)
    return chosen


def measure_imagenet(benchmark: Benchmark, root: Path, device: torch.device, repeats: int, workers: list[int],
                     train_workers: int) -> tuple[dict, dict[str, float]]:
    """ResNet-18's training comparison, and the loader alone at each worker count."""
    batch = benchmark.recipe.batch_size
    loader_images = (1 + max(map(loader_timed_batches, workers))) * batch
    per_class = math.ceil(max(benchmark.images_needed, loader_images) / IMAGENET_CLASSES) + IMAGENET_VAL_PER_CLASS
    write_imagenet_fixture(root, per_class, np.random.default_rng(0))
    loaded = DATASETS.get("imagenet")().load(root)
    loaders = {str(w): lambda w=w: loader_timing(placed(loaded, device, w), batch, w) for w in workers}
    loader_rates = {w: statistics.median(t.img_per_s for t in runs)
                    for w, runs in interleaved("imagenet loader, workers", loaders, repeats).items()}

    def plain() -> Timing:
        return plain_timing(benchmark, file_batches(loaded.train, batch, train_workers, device), device)

    timings = interleaved(benchmark.name, variants(benchmark, lambda: placed(loaded, device, train_workers), plain,
                                                   device), repeats)
    return {**summary(benchmark, timings), "train_workers": train_workers}, loader_rates


def auto_workers() -> int:
    """The harness's ``loader_workers: auto`` on this machine."""
    from jpqbench.harness.data import loader_workers

    return loader_workers("auto")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                        help="<dataset>/<model> pairs to measure")
    parser.add_argument("--batch-size", type=int, help="every benchmark's batch size (default: paper.yaml's recipe)")
    parser.add_argument("--warmup", type=int, help="untimed steps before the timed ones (default: per benchmark)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default: per benchmark and device)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each measurement (median)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader worker counts of the ImageNet loader-alone measurement")
    parser.add_argument("--train-workers", type=int,
                        help="loader workers of ResNet-18's training (default: the harness's `auto`)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be at least 1: the clock starts after a warm-up step")
    return args


def record(report: dict, name: str, row: dict, path: Path | None) -> None:
    """Add a benchmark's row to ``report`` and rewrite ``path`` with it: a run cut short (a
    device check's time limit) keeps what it measured."""
    report["runs"][name] = row
    for key, variant in (("img_per_s", "harness"), ("plain_img_per_s", "plain")):
        report[key][name] = row[variant]["img_per_s"]
    report["ratio"][name] = row["harness"]["ratio"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":  # before cuBLAS starts, as jpqbench.pipeline.runner.seed_everything sets it for a CUDA run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    chosen = benchmarks(args.models, device, args)
    report = {"device": describe_device(device), "torch": torch.__version__, "threads": args.threads,
              "cpus": len(os.sched_getaffinity(0)), "repeats": args.repeats, "img_per_s": {}, "plain_img_per_s": {},
              "ratio": {}, "loader_img_per_s": {},
              "loader_batch_size": next((b.recipe.batch_size for b in chosen if b.dataset == "imagenet"), None),
              "runs": {}}
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        cifar = [b for b in chosen if b.dataset == "cifar10"]
        for name, row in measure_cifar10(cifar, Path(tmp) / "cifar10", device, args.repeats) if cifar else ():
            record(report, name, row, args.json)
        for benchmark in (b for b in chosen if b.dataset == "imagenet"):
            train_workers = auto_workers() if args.train_workers is None else args.train_workers
            row, report["loader_img_per_s"]["imagenet"] = measure_imagenet(
                benchmark, Path(tmp) / "imagenet", device, args.repeats, args.workers, train_workers)
            record(report, benchmark.name, row, args.json)
    print(markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
