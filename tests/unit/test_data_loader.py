"""DataBundle.loader: deterministic order for a seed, sharding under torch.distributed, and
batches (augmentation included) that do not depend on the number of loader workers."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jpqbench.harness.data import DataBundle, ImageFiles, TensorSplit

SAMPLES = 103  # not a multiple of the world size or the batch size


def _bundle() -> DataBundle:
    split = TensorSplit(torch.arange(SAMPLES).float().unsqueeze(1), torch.arange(SAMPLES))
    return DataBundle("toy", split, split, split, num_classes=SAMPLES, input_shape=(1,), default_model="")


def _order(loader) -> list[int]:
    return [int(i) for _, targets in loader for i in targets]


def test_shuffled_order_depends_on_the_generator_only() -> None:
    data = _bundle()
    first = _order(data.loader("train", 10, shuffle=True, generator=torch.Generator().manual_seed(3)))
    again = _order(data.loader("train", 10, shuffle=True, generator=torch.Generator().manual_seed(3)))
    other = _order(data.loader("train", 10, shuffle=True, generator=torch.Generator().manual_seed(4)))
    assert first == again != other and sorted(first) == list(range(SAMPLES))


def _rank_order(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = _bundle()
        shuffled = _order(data.loader("train", 10, shuffle=True, generator=torch.Generator().manual_seed(3)))
        whole = _order(data.loader("test", 10))
        torch.save({"shuffled": shuffled, "whole": whole}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_get_disjoint_shards_of_one_permutation(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_rank_order, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    shards = [r["shuffled"] for r in ranks]
    per_rank = -(-SAMPLES // world)  # DistributedSampler pads to equal length
    assert [len(shard) for shard in shards] == [per_rank] * world
    assert set(shards[0]) | set(shards[1]) == set(range(SAMPLES))
    assert len(set(shards[0]) & set(shards[1])) == per_rank * world - SAMPLES  # only the padding repeats
    assert shards[0] != sorted(shards[0])  # shuffled
    assert all(r["whole"] == list(range(SAMPLES)) for r in ranks)  # evaluation sees the whole split


def _image_files(root: Path) -> DataBundle:
    """A file-backed split of 30 random 12x12 JPEGs with a per-image random crop + flip (as ImageNet's)."""
    from PIL import Image
    from torchvision.transforms import v2

    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(30):
        path = root / f"{index}.png"
        Image.fromarray(torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8, generator=generator).numpy()).save(path)
        paths.append(path)
    augment = v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    split = ImageFiles(paths, torch.arange(30) % 3, augment)
    return DataBundle("files", split, split, split, num_classes=3, input_shape=(3, 8, 8), default_model="")


def test_batches_are_the_same_for_any_number_of_workers(tmp_path: Path) -> None:
    """Two epochs through persistent workers: every augmented batch equals the in-process one,
    and preparing them draws nothing from the training process's random stream."""
    bundles = {workers: dataclasses.replace(_image_files(tmp_path), workers=workers) for workers in (0, 2)}
    epochs = {}
    for workers, data in bundles.items():
        torch.manual_seed(0)
        state = torch.get_rng_state()
        epochs[workers] = [[batch for batch in data.loader("train", 7, shuffle=True,
                                                          generator=torch.Generator().manual_seed(epoch))]
                           for epoch in range(2)]
        assert torch.equal(torch.get_rng_state(), state)
    for zero, two in zip(epochs[0], epochs[2]):
        assert len(zero) == len(two) == 5
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(zero, two))
    assert not torch.equal(epochs[0][0][0][0], epochs[0][1][0][0])  # another epoch, other draws


def test_zero_and_two_workers_train_bit_identical_models(tmp_path: Path) -> None:
    from torch import nn

    from jpqbench.harness.train import TrainSpec, fit

    data = _image_files(tmp_path)
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        result = fit(model, dataclasses.replace(data, workers=workers), TrainSpec(epochs=2, lr=0.1, batch_size=8),
                     seed=1, phase="p")
        states.append((model.state_dict(), result.history))
    (first, first_history), (second, second_history) = states
    assert first_history == second_history
    assert all(torch.equal(first[k], second[k]) for k in first)
