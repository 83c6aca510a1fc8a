"""benchmarks/throughput.py at toy sizes on the CPU: the JSON that ``jpqbench estimate --throughput``
reads, and evidence that both loops it times really trained. No timing is asserted: figures
from a toy run on a shared machine mean nothing.

* ``img_per_s`` maps each ``<dataset>/<model>`` to the harness's img/s, and the file is one that
  ``jpqbench.pipeline.estimate.read_throughput`` accepts;
* every loop (harness and plain, every repeat) ends with a finite loss and changed weights;
* the ImageNet loader alone is measured at each worker count asked for;
* the fixtures are what the plugins read, sized for the steps asked for.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from paths import REPO_ROOT

from jpqbench.base.registry import DATASETS
from jpqbench.pipeline.estimate import read_throughput

SCRIPT = REPO_ROOT / "benchmarks" / "throughput.py"
TOY = ["--batch-size", "4", "--warmup", "1", "--steps", "2", "--repeats", "2", "--threads", "1"]


def _script():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


throughput = _script()


@pytest.mark.slow
def test_the_report_holds_the_harness_img_per_s_of_each_benchmark_and_both_loops_trained(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    models = ["cifar10/resnet8", "imagenet/resnet18"]
    threads = torch.get_num_threads()
    try:
        assert throughput.main(["--models", *models, *TOY, "--workers", "0", "1", "--train-workers", "0",
                                "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets the process's thread count
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and set(report["img_per_s"]) == set(models)
    assert read_throughput(out) == ("cpu", report["img_per_s"])
    assert set(report["loader_img_per_s"]["imagenet"]) == {"0", "1"}
    assert all(rate > 0 for rate in report["loader_img_per_s"]["imagenet"].values())
    for name in models:
        row = report["runs"][name]
        assert row["batch_size"] == 4 and row["steps"] == 2
        assert report["img_per_s"][name] == row["harness"]["img_per_s"] > 0
        assert report["ratio"][name] == row["harness"]["ratio"] > 0
        assert row["harness"]["median_step_ratio"] > 0  # the CPU's second, burst-robust figure
        for loop in ("harness", "plain"):
            assert len(row[loop]["repeats"]) == 2, (name, loop)
            assert all(math.isfinite(loss) for loss in row[loop]["loss"]), (name, loop)
            assert all(change > 0 for change in row[loop]["weight_change"]), (name, loop)


def test_defaults_take_the_papers_recipe_with_a_cpu_sized_resnet18_batch() -> None:
    args = throughput.parse_args([])
    chosen = {b.name: b for b in throughput.benchmarks(args.models, torch.device("cpu"), args)}
    assert set(chosen) == set(throughput.BENCHMARKS) and args.workers == [0, 1, 2]
    assert (chosen["cifar10/resnet8"].recipe.batch_size, chosen["cifar10/resnet8"].recipe.optimizer) == (32, "adam")
    assert (chosen["cifar10/resnet20"].recipe.batch_size, chosen["cifar10/resnet20"].recipe.optimizer) == (128, "sgd")
    assert chosen["imagenet/resnet18"].recipe.batch_size == throughput.CPU_BATCH["imagenet/resnet18"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--warmup", "0"])


def test_the_fixtures_are_read_by_the_plugins(tmp_path: Path) -> None:
    images, targets = throughput.write_cifar10_fixture(tmp_path / "cifar", 30, np.random.default_rng(0))
    bundle = DATASETS.get("cifar10")(verify_checksums=False).load(tmp_path / "cifar")
    assert images.shape == (150, 3, 32, 32) and images.dtype == torch.uint8 and len(targets) == 150
    assert len(bundle.train) + len(bundle.val) == 150
    throughput.write_imagenet_fixture(tmp_path / "imagenet", 12, np.random.default_rng(0))
    bundle = DATASETS.get("imagenet")().load(tmp_path / "imagenet")
    classes = throughput.IMAGENET_CLASSES
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2 * classes, 10 * classes, classes)
    inputs, _ = next(iter(bundle.loader("train", 2, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert inputs.shape == (2, 3, 224, 224)
