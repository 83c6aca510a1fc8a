"""The 8x8 handwritten digits that ship with scikit-learn: the embedded dataset.

1,797 grey-scale images of the digits 0-9 (the UCI "optical recognition of handwritten
digits" test set, pixel values 0..16). ``sklearn.datasets.load_digits`` reads them from
scikit-learn's own package data, so ``prepare`` needs no network and the whole benchmark
grid can run on an offline machine.

``prepare`` writes, under ``root``:

* ``digits.npz`` -- ``images`` uint8 (1797, 8, 8) as shipped, ``labels`` int64 (1797,) and
  ``split`` int8 (1797,): the split of each image (0 train, 1 val, 2 test), so the three
  splits are disjoint by construction;
* ``MANIFEST.json`` -- the sha256 of ``digits.npz`` and how the split was made. It is
  written last, so an interrupted ``prepare`` leaves no manifest and ``load`` asks for a
  new ``prepare`` instead of reading half a file.

The split is made once, in ``prepare``, with the fixed seed 0 -- not the run seed -- so every
method and every seed trains, selects and is tested on exactly the same images: a stratified
20 % test split, then a stratified 15 % of the remaining training part as validation
(1,221 / 216 / 360 images). ``np.savez`` writes zip entries with a fixed timestamp, so the
file, its sha256 and the bundle's fingerprint (a hash of the manifest) are the same on every
machine that prepares the dataset.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from jpqbench import MANIFEST_FILE, DataBundle, DatasetPlugin, TensorSplit, UserError, file_sha256, register_dataset

DATA_FILE = "digits.npz"
PREPARE_COMMAND = "jpqbench prepare --dataset digits"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
VAL_FRACTION = 0.15  # of the training part left after the test split
TRAIN, VAL, TEST = 0, 1, 2
NUM_CLASSES = 10
MAX_PIXEL = 16  # the digits' pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def _assign_splits(labels: np.ndarray) -> np.ndarray:
    """The split code of each image: a stratified test split, then val carved from the rest."""
    from sklearn.model_selection import train_test_split  # lazy: only `prepare` needs scikit-learn

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels,
                                  random_state=SPLIT_SEED)
    _, val = train_test_split(rest, test_size=VAL_FRACTION, stratify=labels[rest],
                              random_state=SPLIT_SEED)
    split = np.full(len(labels), TRAIN, dtype=np.int8)
    split[val] = VAL
    split[test] = TEST
    return split


def _corrupted(path: Path, root: Path, why: str) -> UserError:
    return UserError(f"digits data file {path} is corrupted ({why})",
                     f"delete the folder {root} and re-run `{PREPARE_COMMAND}` (or, where DVC tracks it, "
                     f"`dvc pull {root}`)")


def _verified_manifest(root: Path) -> str:
    """The manifest's text, after checking that every file exists and matches its sha256."""
    manifest_path, data_path = root / MANIFEST_FILE, root / DATA_FILE
    for path in (manifest_path, data_path):
        if not path.is_file():
            raise UserError(f"digits data file {path} is missing",
                            f"run `{PREPARE_COMMAND}` (it writes the dataset into {root})")
    text = manifest_path.read_text()
    try:
        expected = json.loads(text)["sha256"][DATA_FILE]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _corrupted(manifest_path, root, "not a readable jpqbench manifest") from exc
    if file_sha256(data_path) != expected:
        raise _corrupted(data_path, root, f"its sha256 does not match {manifest_path}")
    return text


@register_dataset("digits")
class Digits(DatasetPlugin):
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) float32 tensors held in memory."""

    default_model = "digits_cnn"
    embedded = True
    num_classes = NUM_CLASSES
    input_shape = (1, 8, 8)
    # prepare's split of the 1,797 images (module doc); tests/unit/test_estimate.py checks it against a load
    split_samples = {"train": 1_221, "val": 216, "test": 360}

    def prepare(self, root: Path) -> None:
        """Write the images, labels and fixed split to ``root/digits.npz`` plus the manifest."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        from sklearn.datasets import load_digits

        digits = load_digits()
        labels = digits.target.astype(np.int64)
        np.savez(root / DATA_FILE, images=digits.images.astype(np.uint8), labels=labels,
                 split=_assign_splits(labels))
        manifest = {
            "source": "sklearn.datasets.load_digits",
            "split": {"seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
                      "val_fraction_of_train": VAL_FRACTION, "codes": {"train": TRAIN, "val": VAL, "test": TEST}},
            "sha256": {DATA_FILE: file_sha256(root / DATA_FILE)},
        }
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def load(self, root: Path) -> DataBundle:
        """Verify the prepared files, then standardise every split with the training statistics.

        Pixels are scaled to [0, 1] (x / 16) and standardised with one mean and one std over
        all training pixels -- not per pixel, because the border pixels are almost always 0
        and their per-pixel std is 0. Val and test use the training statistics, so nothing
        about them leaks into the inputs a method trains on.
        """
        root = Path(root)
        manifest_text = _verified_manifest(root)
        with np.load(root / DATA_FILE) as arrays:
            images = torch.from_numpy(arrays["images"]).float().div_(MAX_PIXEL).unsqueeze(1)
            labels = torch.from_numpy(arrays["labels"])
            split = torch.from_numpy(arrays["split"])
        train_images = images[split == TRAIN]
        images = (images - train_images.mean()) / train_images.std()

        def part(code: int) -> TensorSplit:
            mask = split == code
            return TensorSplit(images[mask].contiguous(), labels[mask])

        return DataBundle(
            name="digits",
            train=part(TRAIN),
            val=part(VAL),
            test=part(TEST),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            default_model=self.default_model,
            fingerprint=hashlib.sha256(manifest_text.encode()).hexdigest()[:16],
        )
