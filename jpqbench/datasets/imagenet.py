"""ImageNet (ILSVRC 2012, 1000 classes), from torchvision's layout or a plain ImageFolder tree.

ImageNet cannot be downloaded automatically: its licence requires each user to register at
image-net.org. The plugin accepts two layouts under ``root``, tried in this order:

1. **torchvision's** (what ``torchvision.datasets.ImageNet`` reads): the official archives
   ``ILSVRC2012_devkit_t12.tar.gz``, ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``
   placed in ``root``. ``prepare`` lets torchvision check their md5s and unpack them into
   ``meta.bin`` + ``train/<wnid>/`` + ``val/<wnid>/`` (it needs scipy for the devkit, and
   about 150 GB). ``load`` then reads the unpacked folders through ``ImageNet``; it never
   unpacks itself, because parallel runs would race to extract the same archives.
   Recognised by ``meta.bin`` (unpacked) or the devkit archive (not yet unpacked).
2. **ImageFolder**: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``, e.g. the
   widely used folder made by the "valprep" script, read through ``ImageFolder``.

torchvision's layout comes first because its md5-checked archives are the one source whose
content is known. Both layouts give the same class indices (class folders sorted by name;
for real ImageNet the sorted wnids) and the same samples.

Splits:

* ``train`` -- the training images minus the validation images, with the standard
  augmentation (``RandomResizedCrop(224)`` + horizontal flip);
* ``val``   -- a fixed 10 images per class (10,000 for ImageNet) of the *training* images,
  drawn with seed 0 -- not the run seed -- so every method and seed selects on the same
  images; exactly stratified, which a 10 % fraction would not need to be;
* ``test``  -- the official validation set (50,000 images), the number every paper reports.

``val`` and ``test`` are resized to 256 and centre-cropped to 224. All splits are normalised
with the ImageNet mean/std. Images are decoded lazily, one file per item. ``num_classes`` of the
bundle is the number of classes found (1000 for ImageNet; a subset such as ImageNet-100 in the
same layout also works), ``input_shape`` is always (3, 224, 224).

Fingerprint: a hash of the sorted relative paths of the training and test images (which fix
the classes, labels and splits) -- not of 150 GB of bytes, which would take longer to read
than a training epoch. A re-encoded image with the same name is therefore not detected.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from jpqbench import DataBundle, DatasetPlugin, ImageFiles, UserError, register_dataset

PREPARE_COMMAND = "jpqbench prepare --dataset imagenet"
DOWNLOAD_PAGE = "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = (DEVKIT_ARCHIVE, "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
META_FILE = "meta.bin"  # what torchvision writes when it parses the devkit
SPLIT_SEED = 0
VAL_PER_CLASS = 10
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# torchvision is imported inside the functions that use it: every dataset plugin is imported
# whenever the registry is read, and that import costs seconds.


def _transform(train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image -> normalised float32 (3, 224, 224)."""
    from torchvision.transforms import v2

    geometry = ([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()] if train
                else [v2.Resize(256), v2.CenterCrop(224)])
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def _placement_fix(root: Path) -> str:
    return (f"ImageNet cannot be downloaded automatically (its licence requires registration): "
            f"download {', '.join(ARCHIVES)} from {DOWNLOAD_PAGE} into {root} and run `{PREPARE_COMMAND}` "
            f"to unpack them, or place an ImageFolder tree {root / 'train'}/<class>/*.JPEG and "
            f"{root / 'val'}/<class>/*.JPEG there")


def _not_found(root: Path) -> UserError:
    return UserError(f"ImageNet is not at {root}: found neither {root / META_FILE} or {root / DEVKIT_ARCHIVE} "
                     f"(torchvision's layout) nor the folders {root / 'train'} and {root / 'val'} (ImageFolder)",
                     _placement_fix(root))


def _train_val_split(targets: np.ndarray, class_names: list[str], root: Path) -> np.ndarray:
    """Boolean mask over the training images: VAL_PER_CLASS of each class, drawn with SPLIT_SEED."""
    rng = np.random.default_rng(SPLIT_SEED)
    counts = np.bincount(targets, minlength=len(class_names))
    by_class = np.split(np.argsort(targets, kind="stable"), np.cumsum(counts)[:-1])
    is_val = np.zeros(len(targets), dtype=bool)
    for name, members in zip(class_names, by_class):
        if len(members) <= VAL_PER_CLASS:
            raise UserError(f"class {name} has {len(members)} training images under {root / 'train'}; the "
                            f"validation split takes {VAL_PER_CLASS} per class and training needs more",
                            f"give every class at least {VAL_PER_CLASS + 1} training images")
        is_val[rng.choice(members, size=VAL_PER_CLASS, replace=False)] = True
    return is_val


@register_dataset("imagenet")
class ImageNet(DatasetPlugin):
    """ImageNet (ILSVRC 2012) from torchvision's unpacked archives or an ImageFolder tree."""

    default_model = "resnet18"
    embedded = False
    num_classes = 1000
    input_shape = (3, 224, 224)
    # ILSVRC-2012's 1,281,167 training images less VAL_PER_CLASS x 1,000 classes; test is the official 50,000 val
    split_samples = {"train": 1_271_167, "val": 10_000, "test": 50_000}

    def prepare(self, root: Path) -> None:
        """Unpack the official archives with torchvision; nothing to do for an ImageFolder tree."""
        root = Path(root)
        if (root / META_FILE).is_file() or (root / DEVKIT_ARCHIVE).is_file():
            for split in ("train", "val"):
                self._read_torchvision(root, split)
        elif not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise _not_found(root)

    def load(self, root: Path) -> DataBundle:
        """Read the layout found under ``root`` and carve the fixed validation split."""
        root = Path(root)
        if (root / META_FILE).is_file():
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    raise UserError(f"{root / META_FILE} is there but the folder {root / split} is missing",
                                    f"put the archives back and re-run `{PREPARE_COMMAND}`; {_placement_fix(root)}")
            train, test = self._read_torchvision(root, "train"), self._read_torchvision(root, "val")
            train_classes, test_classes = train.wnids, test.wnids
        elif (root / DEVKIT_ARCHIVE).is_file():
            raise UserError(f"the ImageNet archives in {root} are not unpacked yet",
                            f"run `{PREPARE_COMMAND}` once before the runs")
        elif (root / "train").is_dir() and (root / "val").is_dir():
            train, test = self._read_folder(root / "train"), self._read_folder(root / "val")
            train_classes, test_classes = train.classes, test.classes
        else:
            raise _not_found(root)
        if train_classes != test_classes:
            raise UserError(f"the class folders of {root / 'train'} and {root / 'val'} differ "
                            f"({len(train_classes)} and {len(test_classes)} classes), so their labels would not match",
                            "give both folders the same class subfolders")

        paths = [Path(path) for path, _ in train.samples]
        targets = np.array(train.targets, dtype=np.int64)
        is_val = _train_val_split(targets, train_classes, root)
        test_paths = [Path(path) for path, _ in test.samples]

        digest = hashlib.sha256()
        for path in paths + test_paths:
            digest.update(path.relative_to(root).as_posix().encode() + b"\n")

        return DataBundle(
            name="imagenet",
            train=ImageFiles([p for p, v in zip(paths, is_val) if not v], torch.from_numpy(targets[~is_val]),
                             _transform(train=True)),
            val=ImageFiles([p for p, v in zip(paths, is_val) if v], torch.from_numpy(targets[is_val]),
                           _transform(train=False)),
            test=ImageFiles(test_paths, torch.tensor(test.targets, dtype=torch.int64), _transform(train=False)),
            num_classes=len(train_classes),
            input_shape=self.input_shape,
            default_model=self.default_model,
            fingerprint=digest.hexdigest()[:16],
        )

    @staticmethod
    def _read_torchvision(root: Path, split: str):
        """torchvision's ``ImageNet`` for one split (unpacking its archive if the folder is missing)."""
        from torchvision.datasets import ImageNet as TorchvisionImageNet

        try:
            return TorchvisionImageNet(str(root), split=split)
        except (RuntimeError, OSError) as exc:  # a missing or corrupted archive; an unreadable folder
            raise UserError(f"reading ImageNet's {split} split from {root} failed: {exc}",
                            _placement_fix(root)) from exc

    @staticmethod
    def _read_folder(folder: Path):
        """torchvision's ``ImageFolder`` over ``folder`` (lists the files, decodes nothing)."""
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(str(folder))
        except FileNotFoundError as exc:  # no class folders, or a class folder without images
            raise UserError(f"the ImageFolder tree {folder} holds no images: {exc}",
                            _placement_fix(folder.parent)) from exc
