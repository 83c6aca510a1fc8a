"""CIFAR-10, read through ``torchvision.datasets.CIFAR10`` exactly as on a user's machine.

``prepare`` asks torchvision to download and extract the official archive into
``root/cifar-10-batches-py``; ``load`` reads it with ``download=False``, so the benchmark
never touches the network mid-run.

Splits:

* ``train`` -- the 50,000 training images minus the validation images, with the standard
  augmentation (random 32x32 crop of the image zero-padded by 4, random horizontal flip),
  done on whole batches (:class:`jpqbench.harness.augment.ImageBatches`);
* ``val``   -- a fixed, stratified 10 % (5,000 images) of the *training* batches, chosen
  with seed 0 -- not the run seed -- so every method and seed selects on the same images;
* ``test``  -- the official ``test_batch`` (10,000 images).

All splits are normalised with the usual CIFAR-10 channel mean/std of the training set.
The images stay in memory as uint8 (about 180 MB for all of CIFAR-10), on the run's GPU when
there is one, and are augmented and converted per batch there.

Checksums: torchvision checks the md5 of every batch file against the official ones and
refuses anything else. That is what a user wants, and it is the default. A test cannot
reproduce the official md5s with a tiny dataset in the same format, so the plugin takes
``verify_checksums=False``: then it reads through a subclass of ``CIFAR10``
whose file lists carry no md5, which torchvision's own ``check_integrity`` treats as
"the file must exist" -- every byte is still read by torchvision's real code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from jpqbench import (
    DataBundle,
    DatasetPlugin,
    ImageBatches,
    TensorSplit,
    UserError,
    fingerprint_tensors,
    register_dataset,
)

PREPARE_COMMAND = "jpqbench prepare --dataset cifar10"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BASE_FOLDER = "cifar-10-batches-py"
SPLIT_SEED = 0
VAL_FRACTION = 0.1  # of the 50,000 training images
NUM_CLASSES = 10
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)  # per-channel std over all training pixels
PADDING = 4  # of the random crop

# torchvision and scikit-learn are imported inside the functions that use them: every
# dataset plugin is imported whenever the registry is read, and these imports cost seconds.


def _cifar10_reader(verify_checksums: bool) -> type:
    """torchvision's CIFAR10, or (tests) a subclass whose file lists carry no md5."""
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class _UncheckedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return _UncheckedCIFAR10


def _manual_fix(root: Path) -> str:
    return (f"run `{PREPARE_COMMAND}` on a machine with internet access, or download {ARCHIVE_URL}, "
            f"extract it and place its folder {BASE_FOLDER} under {root}")


@register_dataset("cifar10")
class Cifar10(DatasetPlugin):
    """CIFAR-10 from torchvision's on-disk format (``cifar-10-batches-py``)."""

    default_model = "resnet8"
    embedded = False
    num_classes = NUM_CLASSES
    input_shape = (3, 32, 32)
    # 50,000 training images less the stratified 10 % val (5,000); test is the official test_batch
    split_samples = {"train": 45_000, "val": 5_000, "test": 10_000}

    def __init__(self, verify_checksums: bool = True) -> None:
        """``verify_checksums=False`` accepts files that are not the official release (tests)."""
        self.verify_checksums = verify_checksums

    @property
    def _reader(self) -> type:
        return _cifar10_reader(self.verify_checksums)

    def prepare(self, root: Path) -> None:
        """Download and extract the archive (torchvision skips it when valid files are there)."""
        root = Path(root)
        try:
            self._reader(root, train=True, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad md5 a RuntimeError
            raise UserError(f"downloading CIFAR-10 into {root} failed: {exc}", _manual_fix(root)) from exc

    def load(self, root: Path) -> DataBundle:
        """Read both parts through torchvision and carve the fixed validation split."""
        root = Path(root)
        reader = self._reader
        folder = root / BASE_FOLDER
        names = [name for name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise UserError(f"CIFAR-10 is not at {folder} (missing: {', '.join(missing)})", _manual_fix(root))

        from sklearn.model_selection import train_test_split

        train_images, train_targets = self._read(root, train=True)
        test_images, test_targets = self._read(root, train=False)
        _, val_index = train_test_split(np.arange(len(train_targets)), test_size=VAL_FRACTION,
                                        stratify=train_targets.numpy(), random_state=SPLIT_SEED)
        is_val = torch.zeros(len(train_targets), dtype=torch.bool)
        is_val[torch.from_numpy(val_index)] = True

        return DataBundle(
            name="cifar10",
            train=TensorSplit(train_images[~is_val], train_targets[~is_val], ImageBatches(MEAN, STD, padding=PADDING)),
            val=TensorSplit(train_images[is_val], train_targets[is_val], ImageBatches(MEAN, STD)),
            test=TensorSplit(test_images, test_targets, ImageBatches(MEAN, STD)),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            default_model=self.default_model,
            fingerprint=fingerprint_tensors(train_images, train_targets, test_images, test_targets, is_val),
        )

    def _read(self, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One part as uint8 (N, 3, 32, 32) images and int64 targets."""
        folder = root / BASE_FOLDER
        try:
            dataset = self._reader(root, train=train, download=False)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            # The files exist (checked by the caller), so torchvision failed on their content.
            raise UserError(f"CIFAR-10 files under {folder} are corrupted or not the official release ({exc})",
                            f"delete the folder {folder} and re-run `{PREPARE_COMMAND}`") from exc
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
        return images, torch.tensor(dataset.targets, dtype=torch.int64)
