"""DataBundle.loader: deterministic order for a seed, and sharding under torch.distributed."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jpqbench.data import DataBundle, TensorSplit

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
