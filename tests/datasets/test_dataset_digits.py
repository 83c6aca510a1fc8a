"""The digits plugin: real scikit-learn data, a fixed stratified split, verified files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    DATASETS.get("digits")().prepare(root)
    return root


def _splits(bundle):
    return {"train": bundle.train, "val": bundle.val, "test": bundle.test}


def test_bundle_shapes_and_sizes(root: Path) -> None:
    bundle = DATASETS.get("digits")().load(root)
    sizes = {name: len(split) for name, split in _splits(bundle).items()}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1221, "val": 216, "test": 360}
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    assert bundle.default_model == "digits_cnn" and len(bundle.fingerprint) == 16
    inputs, targets = next(iter(bundle.loader("train", batch_size=32)))
    assert inputs.shape == (32, 1, 8, 8) and inputs.dtype == torch.float32
    assert targets.dtype == torch.int64


def test_splits_disjoint_and_stratified(root: Path) -> None:
    bundle = DATASETS.get("digits")().load(root)
    rows = {name: {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(split.inputs, split.targets)}
            for name, split in _splits(bundle).items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    overall = torch.bincount(torch.cat([s.targets for s in _splits(bundle).values()]), minlength=10) / 1797
    for split in _splits(bundle).values():
        share = torch.bincount(split.targets, minlength=10) / len(split)
        assert (share - overall).abs().max() < 0.01


def test_load_is_deterministic(root: Path, tmp_path: Path) -> None:
    plugin = DATASETS.get("digits")()
    first, second = plugin.load(root), plugin.load(root)
    plugin.prepare(tmp_path)
    elsewhere = plugin.load(tmp_path)
    for other in (second, elsewhere):
        assert other.fingerprint == first.fingerprint
        for name, split in _splits(first).items():
            assert torch.equal(split.inputs, _splits(other)[name].inputs)
            assert torch.equal(split.targets, _splits(other)[name].targets)


def test_normalised_with_training_statistics(root: Path) -> None:
    bundle = DATASETS.get("digits")().load(root)
    train = bundle.train.inputs
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-5
    # Raw pixels are 0..16, so the training split fixes the grid of normalised values:
    # its minimum is pixel 0 and its maximum pixel 16. Val and test must sit on the same
    # grid, which holds only if they were standardised with the training mean/std.
    low, high = train.min(), train.max()
    for split in (bundle.val, bundle.test):
        levels = (split.inputs - low) / (high - low) * 16
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.min() > -1e-4 and levels.max() < 16 + 1e-4


def test_missing_file_names_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        DATASETS.get("digits")().load(tmp_path / "absent")
    assert "MANIFEST.json" in str(info.value)
    assert "jpqbench prepare --dataset digits" in info.value.fix


def test_truncated_file_is_reported_as_corrupted(tmp_path: Path) -> None:
    plugin = DATASETS.get("digits")()
    plugin.prepare(tmp_path)
    data = tmp_path / "digits.npz"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(UserError) as info:
        plugin.load(tmp_path)
    assert "corrupted" in info.value.problem and "digits.npz" in info.value.problem
    assert "jpqbench prepare --dataset digits" in info.value.fix
