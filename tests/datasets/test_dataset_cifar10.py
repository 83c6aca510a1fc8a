"""The CIFAR-10 plugin, on a tiny dataset written in CIFAR-10's exact on-disk format.

The real batches are Python 2 pickles of dicts whose ``str`` keys (``data``, ``labels``,
``label_names``) come back as ``str`` under torchvision's ``pickle.load(..., encoding="latin1")``;
``data`` is a uint8 (N, 3072) array of channel-major rows, ``labels`` a list of ints. The
fixture writes the same structure, so ``load()`` runs the same torchvision reading code as on
real data. Only the md5 check cannot pass on invented files, hence ``verify_checksums=False``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS

PER_BATCH = 20  # 100 training images (10 of them val), 20 test images
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_batch(path: Path, data: np.ndarray, labels: list[int], name: str) -> None:
    entry = {"batch_label": name, "labels": labels, "data": data,
             "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(entry, protocol=2))


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    """A root holding ``cifar-10-batches-py`` and the images/labels written to it."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written: dict[str, list] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.permutation(np.arange(PER_BATCH) % 10)]
        _write_batch(folder / name, data, labels, name)
        written["test" if name == "test_batch" else "train"] += list(zip(data, labels))
    meta = {"label_names": CLASSES, "num_cases_per_batch": PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root, written


def _rows(split) -> list[tuple[bytes, int]]:
    """(raw image bytes, label) of each image, undoing the normalisation (no augmentation)."""
    images, targets = split.__getitems__(list(range(len(split))))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    raw = (images * std + mean).mul(255).round().to(torch.uint8)
    return [(image.flatten().numpy().tobytes(), int(label)) for image, label in zip(raw, targets)]


def test_load_reads_the_on_disk_format(fake_cifar) -> None:
    root, written = fake_cifar
    bundle = DATASETS.get("cifar10")(verify_checksums=False).load(root)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (90, 10, 20)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert bundle.default_model == "resnet8" and bundle.fingerprint

    # Test split = test_batch, in file order, images and labels round-tripped exactly.
    assert _rows(bundle.test) == [(data.tobytes(), label) for data, label in written["test"]]
    # Val is carved from the training batches, disjoint from train, and together they are all of it.
    train_rows = {(data.tobytes(), label) for data, label in written["train"]}
    val = set(_rows(bundle.val))
    train = {(image.flatten().numpy().tobytes(), int(label))
             for image, label in zip(bundle.train.inputs, bundle.train.targets)}
    assert val <= train_rows and not val & train and val | train == train_rows
    assert sorted(label for _, label in val) == list(range(10))  # stratified: one of each class


def test_loader_serves_augmented_training_batches(fake_cifar) -> None:
    root, _ = fake_cifar
    bundle = DATASETS.get("cifar10")(verify_checksums=False).load(root)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = next(iter(bundle.loader("train", batch_size=16, shuffle=True, generator=generator)))
    assert inputs.shape == (16, 3, 32, 32) and inputs.dtype == torch.float32
    assert targets.shape == (16,) and targets.dtype == torch.int64
    torch.manual_seed(0)
    draws = [bundle.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])  # random crops / flips
    torch.manual_seed(0)
    assert all(torch.equal(draw, bundle.train[0][0]) for draw in draws)  # ... drawn from the seeded RNG
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])  # no augmentation outside train


def test_split_is_identical_across_loads(fake_cifar) -> None:
    root, _ = fake_cifar
    plugin = DATASETS.get("cifar10")(verify_checksums=False)
    first, second = plugin.load(root), plugin.load(root)
    assert first.fingerprint == second.fingerprint
    assert torch.equal(first.val.inputs, second.val.inputs)
    assert torch.equal(first.train.inputs, second.train.inputs)


def test_checksums_are_verified_by_default(fake_cifar) -> None:
    root, _ = fake_cifar
    with pytest.raises(UserError) as info:
        DATASETS.get("cifar10")().load(root)
    assert "corrupted" in info.value.problem
    assert "jpqbench prepare --dataset cifar10" in info.value.fix


def test_missing_folder_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        DATASETS.get("cifar10")().load(tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in info.value.problem
    assert "jpqbench prepare --dataset cifar10" in info.value.fix
    assert "cifar-10-batches-py" in info.value.fix


def test_failed_download_explains_manual_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError) as info:
        DATASETS.get("cifar10")().prepare(tmp_path)
    assert "download" in info.value.problem
    assert "cifar-10-batches-py" in info.value.fix and str(tmp_path) in info.value.fix
