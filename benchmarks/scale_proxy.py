"""Scale proxy: every method of the papers' grid at paper.yaml's settings, on the real
architectures at their real input sizes, for a capped number of steps.

    python benchmarks/scale_proxy.py [--budget 0.1] [--benchmark imagenet/resnet18 cifar10/resnet20]
                                     [--method djpq cwmpq ...] [--batch-size 8] [--steps 1]

What it checks is what a digits-sized test cannot: that each method's *settings* hold at the
papers' input sizes and layer shapes -- no stage pruned away, bit widths inside their ranges,
the budget reached -- before thousands of GPU-hours are spent on them. It does not measure
accuracy: the models start from random initialisation (no pretraining) and train a few steps.

For each benchmark it

1. writes a small fixture in the dataset's exact on-disk format (ImageNet: the ImageFolder tree
   ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG`` of 256x256+ JPEGs; CIFAR-10: the
   ``cifar-10-batches-py`` pickles) and loads it through the dataset plugin, as a run would;
2. resolves the recipe and every method's hyperparameters from ``config/paper.yaml`` exactly
   as ``jpqbench run`` does (``BenchConfig.method_params_of``);
3. caps only what makes it affordable on a CPU, and prints the caps: steps per epoch
   (``--steps``), batch size, validation once at the end, and the size of ajpq's search
   (:data:`SEARCH_CAPS`); every epoch count, schedule fraction, bit range and regulariser
   strength stays paper.yaml's;
4. runs the method's ``compress``, checks its plan against the model (``verify_plan``), counts it
   with the harness's counter, and prints per layer the kept output channels and the bits, the
   achieved and (for a projecting method) searched relative BOPs, and whether any layer was wiped
   out (every output channel pruned). The exit status is 1 if a layer was wiped out or a method
   failed.

Results go to ``benchmarks/results.md`` by hand, with the command that produced them.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import MethodParams, TrainRecipe, load_config
from jpqbench.base.method_spec import make_method
from jpqbench.base.registry import DATASETS
from jpqbench.harness.data import DataBundle
from jpqbench.harness.method import RunContext
from jpqbench.pipeline.runner import build_model, seed_everything

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"
# What a CPU cannot afford of a search at paper scale (600 episodes with a 10k-sample reward):
# the search runs, at a handful of episodes, with every other setting paper.yaml's.
SEARCH_CAPS: dict[str, dict[str, int]] = {
    "ajpq": {"episodes": 4, "warmup_episodes": 2},
}
IMAGENET_CLASSES = 8  # fixture classes (ImageNet's val split takes 10 training images of each)
IMAGENET_TRAIN_PER_CLASS = 13
CIFAR_PER_BATCH = 40


def write_imagenet_fixture(root: Path, rng: np.random.Generator) -> None:
    """ImageFolder layout, random-noise JPEGs of ImageNet-like sizes (the loader resizes and crops to 224)."""
    for index in range(IMAGENET_CLASSES):
        wnid = f"n{1440764 + index:08d}"
        for split, count_, stem in (("train", IMAGENET_TRAIN_PER_CLASS, wnid), ("val", 2, "ILSVRC2012_val")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for number in range(count_):
                pixels = rng.integers(0, 256, size=(256 + 8 * number, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{stem}_{index:03d}{number:05d}.JPEG", quality=85)


def write_cifar10_fixture(root: Path, rng: np.random.Generator) -> None:
    """``cifar-10-batches-py``: Python pickles of {data: uint8 (N, 3072), labels: [int]}, as torchvision reads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels = [int(label) for label in rng.permutation(np.arange(CIFAR_PER_BATCH) % 10)]
        batch = {"batch_label": name, "labels": labels, "filenames": [f"{name}_{i}.png" for i in labels],
                 "data": rng.integers(0, 256, size=(CIFAR_PER_BATCH, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": CIFAR_PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


FIXTURES = {"imagenet": write_imagenet_fixture, "cifar10": write_cifar10_fixture}
PLUGIN_OPTIONS = {"cifar10": {"verify_checksums": False}}  # invented files cannot match CIFAR's md5s


def layer_lines(plan: CompressionPlan) -> tuple[list[str], list[str]]:
    """One line per layer (kept channels, weight bits over the kept channels, activation bits) and
    the names of layers with every output channel pruned."""
    lines, wiped = [], []
    for name, layer in plan.layers.items():
        kept = layer.out_channels - len(layer.pruned)
        bits = [b for b in layer.channel_bits() if b > 0]
        w_bits = f"{min(bits)}-{max(bits)}" if bits and min(bits) != max(bits) else (str(bits[0]) if bits else "-")
        lines.append(f"    {name:<28} kept {kept:>4}/{layer.out_channels:<4} w{w_bits:<5} a{layer.a_bits:<3}"
                     + (f" w_sparsity {layer.w_sparsity:.2f}" if layer.w_sparsity else "")
                     + (f" a_sparsity {layer.a_sparsity:.2f}" if layer.a_sparsity else ""))
        if kept == 0:
            wiped.append(name)
    return lines, wiped


def run_method(spec: str, data: DataBundle, recipe: TrainRecipe, params: MethodParams, budget: Budget,
               work: Path) -> tuple[bool, list[str]]:
    """Compress once; return (healthy, report lines)."""
    name = spec.partition("[")[0]
    method = make_method(spec, {**params, name: {**params.get(name, {}), **SEARCH_CAPS.get(name, {})}})
    seed_everything(0)
    model = build_model(recipe, data)
    ctx = RunContext(data=data, recipe=recipe, epochs=recipe.epochs, seed=0, work_dir=work / spec)
    start = time.perf_counter()
    compressed = method.compress(model, None if not method.takes_budget else budget, ctx)
    seconds = time.perf_counter() - start
    compressed.model.cpu()
    batch = next(iter(ctx.calibration_batches(1))).cpu()
    verify_plan(compressed.plan, compressed.model, batch)
    cost = count(compressed.model, data.input_shape, compressed.plan)
    searched = (count(compressed.model, data.input_shape, compressed.searched).relative_bops
                if compressed.searched else None)
    lines, wiped = layer_lines(compressed.plan)
    head = (f"  {spec}: relative BOPs {cost.relative_bops:.4f} (budget {budget.target:g})"
            + (f", searched {searched:.4f}" if searched is not None else "")
            + f", {ctx.epochs_used} of {recipe.epochs} epochs, {seconds:.0f} s"
            + (f", outside paper regime: {compressed.plan.notes['outside_paper_regime']}"
               if compressed.plan.notes.get("outside_paper_regime") else "")
            + (f"; WIPED OUT: {', '.join(wiped)}" if wiped else ""))
    healthy = not wiped and (not method.takes_budget or cost.relative_bops <= budget.target * 1.10)
    return healthy, [head, *lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.1, help="relative BOPs budget (default 0.1)")
    parser.add_argument("--benchmark", nargs="+", default=["cifar10/resnet20", "imagenet/resnet18"])
    parser.add_argument("--method", nargs="+", default=None, help="method specs (default: paper.yaml's `methods`)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="training steps per epoch")
    args = parser.parse_args(argv)
    config = load_config(PAPER)
    budget = Budget(config.budget_metric, args.budget)
    ok = True
    with tempfile.TemporaryDirectory(prefix="scale_proxy_") as tmp:
        for benchmark in args.benchmark:
            dataset, model_name = benchmark.split("/")
            root = Path(tmp) / dataset
            FIXTURES[dataset](root, np.random.default_rng(0))
            data = DATASETS.get(dataset)(**PLUGIN_OPTIONS.get(dataset, {})).load(root)
            recipe = config.recipe(dataset, model_name).model_copy(update={
                "batch_size": args.batch_size, "max_steps_per_epoch": args.steps, "eval_every": 10**6})
            params = config.method_params_of(dataset, model_name)
            print(f"## {benchmark}: input {tuple(data.input_shape)}, {recipe.epochs} epochs x {args.steps} step(s) of "
                  f"batch {args.batch_size}, budget {args.budget:g} {config.budget_metric}; caps: {SEARCH_CAPS}",
                  flush=True)
            for spec in args.method or config.methods:
                try:
                    healthy, lines = run_method(spec, data, recipe, params, budget, root / "work")
                except Exception:  # noqa: BLE001 -- a failing method is reported, and the others still run
                    healthy, lines = False, [f"  {spec}: FAILED", traceback.format_exc()]
                ok &= healthy
                print("\n".join(lines), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
