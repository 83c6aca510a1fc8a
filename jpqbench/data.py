"""The data contract between dataset plugins and the harness.

A dataset plugin is a function registered with ``@register_dataset(name)`` that returns a
:class:`DataBundle`. The bundle carries three disjoint splits:

* ``train`` -- what methods train on;
* ``val``   -- carved from the *training* data, used for any selection a method makes
  (RL rewards, calibration checks, early decisions). Never the test split;
* ``test``  -- touched once, at the end of a run, by the harness (``evaluate``).

Small datasets hold tensors in memory (:class:`TensorSplit`) and are served in whole
batches through a ``DataLoader`` with a batch sampler, which keeps the per-step Python
overhead near zero. Large datasets (CIFAR-10 from disk, ImageNet) are ordinary
``torch.utils.data.Dataset`` objects.

Datasets live and are decoded/augmented on the CPU; :meth:`DataBundle.loader` delivers every
batch on the bundle's ``device`` (the run's: training, evaluation, calibration and method
searches all draw their batches there), so no method moves a batch itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler,
                              Subset)

from jpqbench.errors import UserError


class TensorSplit(Dataset):
    """An in-memory split; ``__getitems__`` lets the DataLoader fetch a whole batch at once."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return self.inputs[idx], self.targets[idx]


class ImageFiles(Dataset):
    """Image files decoded on access: ``paths[i]`` with class index ``targets[i]``.

    A map-style dataset, so a ``DistributedSampler`` can shard it. ``transform`` takes the
    decoded uint8 (3, H, W) RGB tensor and returns the float32 model input; random
    transforms draw from torch's global RNG, which a run seeds.
    """

    def __init__(self, paths: list[Path], targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.paths = paths
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29;
        # convert("RGB") also covers ImageNet's few greyscale and CMYK JPEGs.
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            with Image.open(self.paths[index]) as image:
                pixels = pil_to_tensor(image.convert("RGB"))
        except OSError as error:  # unreadable, not an image, or truncated (PIL refuses a truncated image)
            raise UserError(f"image file {self.paths[index]} is unreadable or truncated ({error})",
                            "restore the dataset: re-run `jpqbench prepare` for it, or `dvc pull` where DVC tracks "
                            "it") from None
        return self.transform(pixels), self.targets[index]


def _identity(batch):
    return batch


class _OnDevice:
    """A loader whose batches are moved to ``device`` as they are drawn (from pinned memory)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in self.loader:
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


@dataclass
class DataBundle:
    """Everything a run needs to know about a dataset."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, without the batch dimension (C, H, W)
    default_model: str
    fingerprint: str = ""  # hash of the prepared files, logged with every run
    device: torch.device = torch.device("cpu")  # where loader() delivers batches: the run's device

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               generator: torch.Generator | None = None,
               indices: Sequence[int] | None = None) -> DataLoader | _OnDevice:
        """A deterministic loader of (inputs, targets) batches on :attr:`device`: with ``shuffle``
        the order comes from ``generator`` only (a CPU generator, so the order is the same on
        every device). ``indices`` restricts it to those samples of the split, served in that
        order when not shuffled (a fixed subset, e.g. :func:`stratified_subset`).

        Under ``torch.distributed`` (a DDP run started by ``torchrun``) a shuffled loader gives
        each process its own shard of one permutation: every rank draws the permutation's seed
        from its identically seeded ``generator``, so the shards are disjoint and together cover
        the split (padded to equal length, as ``DistributedSampler`` does). Unshuffled loaders
        (evaluation) are not sharded: every process evaluates the whole split.
        """
        source = {"train": self.train, "val": self.val, "test": self.test}[split]
        dataset = source if indices is None else Subset(source, list(indices))
        if shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = int(torch.randint(2**62, (1,), generator=generator))
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=generator)
        else:
            sampler = SequentialSampler(dataset)
        batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
        on_gpu = self.device.type == "cuda"
        if hasattr(source, "__getitems__"):  # a Subset always has one; it batches only when its source does
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_identity, pin_memory=on_gpu)
        else:
            loader = DataLoader(dataset, batch_sampler=batches, pin_memory=on_gpu)
        return _OnDevice(loader, self.device) if self.device.type != "cpu" else loader


def split_targets(dataset: Dataset) -> torch.Tensor:
    """The class index of every sample of a split, in order.

    Read from the split's ``targets`` (every shipped split has them), so no input is decoded;
    a split without them is read sample by sample.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.int64)


def stratified_subset(targets: torch.Tensor, size: int, seed: int) -> list[int]:
    """``size`` sample indices of a split with class indices ``targets``, in a shuffled order,
    the same for the same ``seed``; every index, shuffled, when ``size`` >= the split's length.

    Stratified because splits may be stored class by class (ImageNet's and Tiny ImageNet's val
    follow the class-sorted file list; Speech Commands puts its keyword clips first), so a
    prefix of the split holds a few classes only. With ``size`` >= the number of classes every
    class gets one sample and the rest is shared in proportion to the class sizes (largest
    remainders, ties broken at random); below that, classes are drawn in proportion.
    """
    labels = targets.cpu().numpy()
    rng = np.random.default_rng(seed)
    if size >= len(labels):
        return rng.permutation(len(labels)).tolist()
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.ones_like(counts) if size >= len(classes) else np.zeros_like(counts)
    exact = (counts - floor) * (size - floor.sum()) / (len(labels) - floor.sum())
    quota = floor + np.floor(exact).astype(int)
    by_remainder = np.lexsort((rng.random(len(classes)), -(exact - np.floor(exact))))
    quota[by_remainder[:size - quota.sum()]] += 1
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    return rng.permutation(chosen).tolist()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and data files may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_tensors(*tensors: torch.Tensor) -> str:
    """A short content hash of tensors, for the ``data_hash`` tag of every run."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class DatasetPlugin:
    """Base class of a dataset plugin (one file in ``datasets/``).

    ``prepare`` puts the data on disk under ``root`` (downloading where the dataset is
    downloadable and the machine is online; writing it when the dataset is embedded);
    ``load`` reads it back into a :class:`DataBundle` and raises
    :class:`jpqbench.errors.UserError` naming the missing file and the command that makes it.
    """

    default_model: str = ""
    embedded: bool = False  # True when prepare() needs no network
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()  # one sample, (C, H, W): lets `jpqbench cost` run without the data

    def prepare(self, root) -> None:  # root: pathlib.Path
        raise NotImplementedError

    def load(self, root) -> DataBundle:
        raise NotImplementedError
