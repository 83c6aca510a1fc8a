"""The data contract between dataset plugins and the harness.

A dataset plugin is a :class:`DatasetPlugin` subclass registered with ``@register_dataset(name)``;
its ``load`` returns a :class:`DataBundle`. The bundle carries three disjoint splits:

* ``train`` -- what methods train on;
* ``val``   -- carved from the *training* data, used for any selection a method makes
  (RL rewards, calibration checks, early decisions). Never the test split;
* ``test``  -- touched once, at the end of a run, by the harness (``evaluate``).

Two kinds of split, served two ways by :meth:`DataBundle.loader`:

* **In memory** (:class:`TensorSplit`): stored samples (float, uint8 images, int16 audio) and a
  ``transform`` module that turns a batch of them into model inputs (decoding, normalising,
  random augmentation) on whatever device the split lives on. The training process indexes
  whole batches itself -- no loader workers, no per-sample Python. :meth:`DataBundle.to` moves
  these splits onto the run's device when they fit (digits, minispeech, CIFAR-10, Speech
  Commands, Tiny ImageNet as uint8), so a GPU run never copies a batch from the host.
* **Files** (any other ``torch.utils.data.Dataset``, e.g. :class:`ImageFiles` for ImageNet):
  decoded and augmented per sample by ``DataLoader`` worker processes (:attr:`DataBundle.workers`,
  persistent across epochs, with prefetching and pinned memory on a GPU), overlapped with
  training.

**Results do not depend on the number of workers.** Batch order comes from the loader's
``generator`` only. The random augmentation of every batch draws from torch's CPU generator
reseeded for that batch from (the loader's generator seed -- the run seed, phase and epoch in
training --, the rank, the batch's position), whichever process prepares it; the training
process's own random stream is untouched by data preparation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)

from jpqbench.base import atomic
from jpqbench.base.errors import UserError

RESIDENT_SHARE = 0.5  # in-memory splits move to a GPU when together they take at most this share of its free memory
MAX_AUTO_WORKERS = 8
PREFETCH_BATCHES = 4  # per loader worker


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory without making
    the host wait for the GPU (a pageable copy would)."""
    if tensor.device.type == device.type:
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TensorSplit(Dataset):
    """An in-memory split: stored ``inputs`` and ``targets``, and a ``transform`` (an ``nn.Module``,
    so it moves with the split; None: the stored inputs are the model inputs) applied to each
    batch of stored inputs where they live. A random transform draws from torch's CPU generator
    (see :mod:`jpqbench.harness.augment`), which the loader seeds per batch.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, transform: nn.Module | None = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        stored = self.inputs[idx]
        return (stored if self.transform is None else self.transform(stored)), self.targets[idx]

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + self.targets.nbytes

    def to(self, device: torch.device) -> TensorSplit:
        """A copy of the split (its transform's buffers included) on ``device``."""
        transform = None if self.transform is None else copy.deepcopy(self.transform).to(device)
        return TensorSplit(self.inputs.to(device), self.targets.to(device), transform)


class ImageFiles(Dataset):
    """Image files decoded on access: ``paths[i]`` with class index ``targets[i]``.

    A map-style dataset, so a ``DistributedSampler`` can shard it. ``transform`` takes the
    decoded uint8 (3, H, W) RGB tensor and returns the float32 model input; random
    transforms draw from torch's global RNG, which the loader seeds per batch.
    """

    def __init__(self, paths: list[Path], targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.paths = paths
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(decode_image(self.paths[index])), self.targets[index]


def decode_image(path: Path) -> torch.Tensor:
    """The image file at ``path`` as a uint8 (3, H, W) RGB tensor; a UserError when it is unreadable."""
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29;
    # convert("RGB") also covers ImageNet's few greyscale and CMYK JPEGs.
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except OSError as error:  # unreadable, not an image, or truncated (PIL refuses a truncated image)
        raise UserError(f"image file {path} is unreadable or truncated ({error})",
                        "restore the dataset: re-run `jpqbench prepare` for it, or `dvc pull` where DVC tracks "
                        "it") from None


def loader_workers(setting: int | str) -> int:
    """The number of loader worker processes per training process for the config's
    ``loader_workers``: a number as given, or ``auto`` -- the CPUs this process may use (SLURM's
    ``--cpus-per-task`` where set, else its CPU affinity), shared by the processes torchrun
    starts on this node, less one for the training process itself, at most 8."""
    if setting != "auto":
        return int(setting)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


class _Batch(list):
    """The sample indices of one batch, and the seed of its random augmentation (None: not augmented)."""

    seed: int | None = None


def _batch_seed(base: int, number: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{base}/{number}".encode(), digest_size=8).digest(), "little") >> 1


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """torch's CPU generator seeded with ``seed`` for the block, and restored after it (the CPU's
    only: ``torch.manual_seed`` would reseed the GPU's generator too, which is not restored)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class _Batches(Sampler):
    """The batches of one pass over ``split`` (or over its samples ``indices``): in the order of a
    ``generator``-seeded permutation (each rank its shard under torch.distributed) or in order,
    each with its augmentation seed when ``augment_base`` is set. A persistent loader keeps one
    and is handed each epoch's generator through :meth:`restart`."""

    def __init__(self, split: Dataset, batch_size: int, shuffle: bool, indices: Sequence[int] | None) -> None:
        self.size = len(split) if indices is None else len(indices)
        self.batch_size, self.shuffle, self.indices = batch_size, shuffle, indices
        self.generator: torch.Generator | None = None
        self.augment_base: int | None = None

    def restart(self, generator: torch.Generator | None, augment_base: int | None) -> _Batches:
        self.generator, self.augment_base = generator, augment_base
        return self

    def _order(self) -> Sampler:
        positions = range(self.size)
        if self.shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = int(torch.randint(2**62, (1,), generator=self.generator))
            return DistributedSampler(positions, shuffle=True, seed=seed, drop_last=False)
        if self.shuffle:
            return RandomSampler(positions, generator=self.generator)
        return SequentialSampler(positions)

    def __iter__(self) -> Iterator[_Batch]:
        for number, chunk in enumerate(BatchSampler(self._order(), self.batch_size, drop_last=False)):
            batch = _Batch(chunk if self.indices is None else (self.indices[p] for p in chunk))
            if self.augment_base is not None:
                batch.seed = _batch_seed(self.augment_base, number)
            yield batch

    def __len__(self) -> int:
        shards = torch.distributed.get_world_size() if self.shuffle and torch.distributed.is_initialized() else 1
        return math.ceil(math.ceil(self.size / shards) / self.batch_size)  # DistributedSampler pads each shard


class _SeededFetch(Dataset):
    """``dataset`` fetched a batch at a time (in a loader worker or the training process) with
    torch's generator seeded by the batch's seed, so per-sample random transforms draw the
    same values whichever process runs them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with _seeded(batch.seed):
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(list(batch))
            return default_collate([self.dataset[index] for index in batch])


def _identity(batch):
    return batch


class _TensorBatches:
    """The batches of a :class:`TensorSplit`, indexed and transformed in the training process
    where the split lives, then delivered on ``device``."""

    def __init__(self, split: TensorSplit, batches: _Batches, device: torch.device) -> None:
        self.split, self.batches, self.device = split, batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        home = self.split.targets.device
        for batch in self.batches:
            with _seeded(batch.seed):
                inputs, targets = self.split.__getitems__(host_to_device(torch.tensor(batch), home))
            yield host_to_device(inputs, self.device), host_to_device(targets, self.device)


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
    workers: int = 0  # loader worker processes for splits read from files (not for in-memory splits)
    _loaders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def to(self, device: torch.device) -> DataBundle:
        """This bundle delivering its batches on ``device``, its in-memory splits moved there when
        together they take at most :data:`RESIDENT_SHARE` of the device's free memory (else
        they stay in host memory and each batch is copied over)."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        in_memory = {name: split for name, split in splits.items() if isinstance(split, TensorSplit)}
        if device.type == "cuda" and in_memory:
            free, _ = torch.cuda.mem_get_info(device)
            if sum(split.nbytes for split in in_memory.values()) <= RESIDENT_SHARE * free:
                splits.update({name: split.to(device) for name, split in in_memory.items()})
        return DataBundle(self.name, **splits, num_classes=self.num_classes, input_shape=self.input_shape,
                          default_model=self.default_model, fingerprint=self.fingerprint, device=device,
                          workers=self.workers)

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               generator: torch.Generator | None = None,
               indices: Sequence[int] | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """A deterministic loader of (inputs, targets) batches on :attr:`device`: with ``shuffle``
        the order comes from ``generator`` only (a CPU generator, so the order is the same on
        every device). ``indices`` restricts it to those samples of the split, served in that
        order when not shuffled (a fixed subset, e.g. :func:`stratified_subset`).

        A transform's random draws (the training split's augmentation) are seeded per batch from
        ``generator``'s seed, never from the process that prepares the batch, so the batches are
        the same for any number of :attr:`workers`; without a generator (evaluation, a fixed
        subset) every pass draws the same.

        Under ``torch.distributed`` (a DDP run started by ``torchrun``) a shuffled loader gives
        each process its own shard of one permutation: every rank draws the permutation's seed
        from its identically seeded ``generator``, so the shards are disjoint and together cover
        the split (padded to equal length, as ``DistributedSampler`` does). Unshuffled loaders
        (evaluation) are not sharded: every process evaluates the whole split.
        """
        source = {"train": self.train, "val": self.val, "test": self.test}[split]
        in_memory = isinstance(source, TensorSplit)
        augment_base = None
        if not in_memory or source.transform is not None:  # a transform that may draw random numbers
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            augment_base = _batch_seed(generator.initial_seed() if generator is not None else 0, rank)
        if in_memory:
            batches = _Batches(source, batch_size, shuffle, indices)
            return _TensorBatches(source, batches.restart(generator, augment_base), self.device)
        return self._file_loader(split, source, batch_size, shuffle, indices).restart(generator, augment_base)

    def _file_loader(self, split: str, source: Dataset, batch_size: int, shuffle: bool,
                     indices: Sequence[int] | None) -> _FileLoader:
        """The worker-backed loader of a split read from files; with workers it is kept (its
        worker processes persist across epochs) per (split, batch size, order, subset)."""
        key = (split, batch_size, shuffle, None if indices is None else tuple(indices))
        if key in self._loaders:
            return self._loaders[key]
        batches = _Batches(source, batch_size, shuffle, indices)
        workers = {"num_workers": self.workers, "persistent_workers": True,
                   "prefetch_factor": PREFETCH_BATCHES} if self.workers else {}
        # its own generator: creating an iterator draws the workers' base seed, which must not
        # come from the training process's random stream (the augmentation does not use it)
        loader = DataLoader(_SeededFetch(source), batch_sampler=batches, collate_fn=_identity,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator(), **workers)
        wrapped = _FileLoader(loader, batches, self.device)
        if self.workers:
            self._loaders[key] = wrapped
        return wrapped


class _FileLoader:
    """A ``DataLoader`` over a split read from files, restarted for each pass, delivering on ``device``."""

    def __init__(self, loader: DataLoader, batches: _Batches, device: torch.device) -> None:
        self.loader, self.batches, self.device = loader, batches, device

    def restart(self, generator: torch.Generator | None, augment_base: int | None) -> _FileLoader:
        self.batches.restart(generator, augment_base)
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in self.loader:
            yield host_to_device(inputs, self.device), host_to_device(targets, self.device)


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


MANIFEST_FILE = "MANIFEST.json"  # written last by `jpqbench prepare`: the workflow's mark of a complete dataset


def mark_prepared(plugin: DatasetPlugin, name: str, root: Path) -> Path:
    """``root/MANIFEST.json`` after a successful ``prepare``: the embedded datasets write their
    own (every file's sha256); for the others it is written here, after a full :meth:`load` has
    checked that the data is complete and readable, and records the data fingerprint and split
    sizes. The workflow's ``prepare`` rule has it as its output, so it must exist for every
    dataset (a pulled or hand-placed dataset gets it from ``jpqbench prepare`` too)."""
    manifest = Path(root) / MANIFEST_FILE
    if not manifest.exists():
        bundle = plugin.load(root)
        record = {"dataset": name, "fingerprint": bundle.fingerprint,
                  "samples": {split: len(getattr(bundle, split)) for split in ("train", "val", "test")}}
        atomic.write_text(manifest, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return manifest


class DatasetPlugin:
    """Base class of a dataset plugin (one file in ``jpqbench/datasets/``).

    ``prepare`` puts the data on disk under ``root`` (downloading where the dataset is
    downloadable and the machine is online; writing it when the dataset is embedded);
    ``load`` reads it back into a :class:`DataBundle` and raises
    :class:`jpqbench.base.errors.UserError` naming the missing file and the command that makes it.
    """

    default_model: str = ""
    embedded: bool = False  # True when prepare() needs no network
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()  # one sample, (C, H, W): lets `jpqbench cost` run without the data

    def prepare(self, root) -> None:  # root: pathlib.Path
        raise NotImplementedError

    def load(self, root) -> DataBundle:
        raise NotImplementedError
