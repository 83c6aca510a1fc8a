"""Tiny ImageNet (200 classes, 64x64 px), read from the official ``tiny-imagenet-200`` folder.

``prepare`` downloads and unzips the official archive into ``root/tiny-imagenet-200`` (there
is no torchvision class for Tiny ImageNet, only its download helper); ``load`` reads the
unzipped folder and never touches the network:

    tiny-imagenet-200/wnids.txt                      one WordNet id per line
    tiny-imagenet-200/words.txt                      wnid -> words (optional, not needed)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 images per class
    tiny-imagenet-200/val/images/*.JPEG              10,000 images
    tiny-imagenet-200/val/val_annotations.txt        filename <tab> wnid <tab> bbox x4

The class index of an image is the position of its wnid in ``wnids.txt``.

Splits:

* ``train`` -- the 100,000 training images minus the validation images, with the standard
  augmentation (random 64x64 crop of the image zero-padded by 4, random horizontal flip),
  done on whole batches (:class:`jpqbench.harness.augment.ImageBatches`);
* ``val``   -- a fixed, stratified 10 % (10,000 images) of the *training* images, chosen with
  seed 0 -- not the run seed -- over the sorted file list, so every method and seed selects
  on the same images;
* ``test``  -- the official validation set (its labels are public; the official test set's
  are not), in the order of ``val_annotations.txt``.

Every image is decoded once, at load (a thread per CPU), converted to RGB (a few Tiny ImageNet
images are greyscale) and kept as uint8: 110,000 x 3 x 64 x 64 bytes = 1.35 GB, which a GPU
holds beside the model, so training indexes, augments and normalises whole batches on the
device with no decoding per epoch. Inputs are normalised with the ImageNet mean/std, the
statistics Tiny ImageNet is usually trained with.

Fingerprint: a hash of ``wnids.txt``, the sorted relative paths of the training images and
``val_annotations.txt`` -- i.e. of what the splits and labels are made of, not of every
image's bytes: hashing 100k files on every load would cost more than a training epoch's
worth of disk reads. A re-encoded image with the same name is therefore not detected.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from jpqbench import DataBundle, DatasetPlugin, ImageBatches, TensorSplit, UserError, decode_image, register_dataset

PREPARE_COMMAND = "jpqbench prepare --dataset tiny_imagenet"
ARCHIVE_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
BASE_FOLDER = "tiny-imagenet-200"
SPLIT_SEED = 0
VAL_FRACTION = 0.1  # of the 100,000 training images
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics
STD = (0.229, 0.224, 0.225)
SIDE = 64  # px
PADDING = 4  # of the random crop

# torchvision and scikit-learn are imported inside the functions that use them: every
# dataset plugin is imported whenever the registry is read, and these imports cost seconds.


def _decoded(paths: list[Path], root: Path) -> torch.Tensor:
    """The images at ``paths`` as one uint8 (N, 3, 64, 64) tensor, decoded by a thread per CPU
    (PIL releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    images = torch.empty(len(paths), 3, SIDE, SIDE, dtype=torch.uint8)

    def decode(index: int) -> None:
        pixels = decode_image(paths[index])
        if pixels.shape[1:] != (SIDE, SIDE):
            raise UserError(f"image file {paths[index]} is {pixels.shape[2]}x{pixels.shape[1]} px, not "
                            f"Tiny ImageNet's {SIDE}x{SIDE}", _manual_fix(root))
        images[index] = pixels

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(decode, range(len(paths))))
    return images


def _manual_fix(root: Path) -> str:
    return (f"run `{PREPARE_COMMAND}` on a machine with internet access, or download {ARCHIVE_URL}, "
            f"unzip it and place its folder {BASE_FOLDER} under {root}")


def _require(path: Path, root: Path, kind: str = "file") -> Path:
    """``path`` itself, or a UserError naming it when it is missing."""
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise UserError(f"Tiny ImageNet is incomplete: the {kind} {path} is missing", _manual_fix(root))
    return path


def _jpegs(folder: Path) -> list[str]:
    """Sorted names of the JPEGs in ``folder`` (sorted so the split never depends on the filesystem)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".JPEG"))


@register_dataset("tiny_imagenet")
class TinyImageNet(DatasetPlugin):
    """Tiny ImageNet from the unzipped official archive (``tiny-imagenet-200``)."""

    default_model = "resnet18_64"
    embedded = False
    num_classes = 200
    input_shape = (3, 64, 64)
    # 100,000 training images less the stratified 10 % val (10,000); test is the official 10,000 val images
    split_samples = {"train": 90_000, "val": 10_000, "test": 10_000}

    def prepare(self, root: Path) -> None:
        """Download and unzip the archive, unless an unzipped copy is already there."""
        root = Path(root)
        if (root / BASE_FOLDER / "wnids.txt").is_file():
            return
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(ARCHIVE_URL, download_root=str(root), md5=ARCHIVE_MD5,
                                         remove_finished=True)
        except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
            # URLError is an OSError; a wrong md5 a RuntimeError; a truncated zip a BadZipFile
            raise UserError(f"downloading Tiny ImageNet into {root} failed: {exc}", _manual_fix(root)) from exc

    def load(self, root: Path) -> DataBundle:
        """List the files, check them against the annotations and carve the fixed val split."""
        root = Path(root)
        folder = _require(root / BASE_FOLDER, root, kind="folder")
        wnids_text = _require(folder / "wnids.txt", root).read_text()
        wnids = wnids_text.split()
        class_index = {wnid: index for index, wnid in enumerate(wnids)}

        train_paths: list[Path] = []
        train_targets: list[int] = []
        for wnid in wnids:
            images = _require(folder / "train" / wnid / "images", root, kind="folder")
            names = _jpegs(images)
            train_paths += [images / name for name in names]
            train_targets += [class_index[wnid]] * len(names)

        test_paths, test_targets, annotations_text = self._read_official_val(folder, root, class_index)

        from sklearn.model_selection import train_test_split

        targets = torch.tensor(train_targets, dtype=torch.int64)
        _, val_index = train_test_split(np.arange(len(targets)), test_size=VAL_FRACTION,
                                        stratify=targets.numpy(), random_state=SPLIT_SEED)
        is_val = np.zeros(len(targets), dtype=bool)
        is_val[val_index] = True

        images, mask = _decoded(train_paths, root), torch.from_numpy(is_val)
        digest = hashlib.sha256(wnids_text.encode())
        for path in train_paths:
            digest.update(path.relative_to(folder).as_posix().encode() + b"\n")
        digest.update(annotations_text.encode())

        return DataBundle(
            name="tiny_imagenet",
            train=TensorSplit(images[~mask], targets[~mask], ImageBatches(MEAN, STD, padding=PADDING)),
            val=TensorSplit(images[mask], targets[mask], ImageBatches(MEAN, STD)),
            test=TensorSplit(_decoded(test_paths, root), torch.tensor(test_targets, dtype=torch.int64),
                             ImageBatches(MEAN, STD)),
            num_classes=len(wnids),
            input_shape=self.input_shape,
            default_model=self.default_model,
            fingerprint=digest.hexdigest()[:16],
        )

    @staticmethod
    def _read_official_val(folder: Path, root: Path,
                           class_index: dict[str, int]) -> tuple[list[Path], list[int], str]:
        """Paths and class indices of the official val images, and the annotation text."""
        images = _require(folder / "val" / "images", root, kind="folder")
        annotations = _require(folder / "val" / "val_annotations.txt", root)
        text = annotations.read_text()
        present = set(_jpegs(images))
        paths: list[Path] = []
        targets: list[int] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            name, wnid = fields[0], fields[1] if len(fields) > 1 else ""
            if wnid not in class_index:
                raise UserError(f"{annotations} line {number} labels {name} with {wnid!r}, which is not in "
                                f"{folder / 'wnids.txt'}", f"the files do not belong together; {_manual_fix(root)}")
            if name not in present:
                raise UserError(f"Tiny ImageNet is incomplete: {images / name}, listed in {annotations}, "
                                "is missing", _manual_fix(root))
            paths.append(images / name)
            targets.append(class_index[wnid])
        return paths, targets, text
