"""The Tiny ImageNet plugin, on a tiny dataset written in the official ``tiny-imagenet-200`` layout.

The fixture writes real 64x64 JPEGs with PIL (one of them greyscale, as some real ones are),
``wnids.txt`` in a deliberately non-alphabetical order (the class index is the line number,
not the sorted position), per-class ``train/<wnid>/images`` folders with the ``<wnid>_boxes.txt``
the real archive has, and ``val/images`` with a tab-separated ``val_annotations.txt``.
Each image has a distinct flat colour, 3 grey levels from any other so JPEG keeps them apart (never black, so the zero padding of a random crop shows).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS
from jpqbench.harness.data import decode_image
from jpqbench.pipeline.cli import main

WNIDS = ["n09999999", "n01443537", "n05555555"]  # file order, not sorted
TRAIN_PER_CLASS = 10  # 30 training images, 3 of them val
VAL_PER_CLASS = 2  # 6 official val images = the test split
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _write_jpeg(path: Path, grey: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = grey if mode == "L" else (grey, 255 - grey, 128)
    Image.new(mode, (64, 64), colour).save(path, quality=95)


def _write_tiny_imagenet(root: Path) -> dict[str, dict[str, int]]:
    """Write the layout under ``root`` and return {split: {file name: class index}}."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{wnid}\tthing {i}\n" for i, wnid in enumerate(WNIDS)))
    labels: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for index, wnid in enumerate(WNIDS):
        (folder / "train" / wnid).mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for number in range(TRAIN_PER_CLASS):
            name = f"{wnid}_{number}.JPEG"
            mode = "L" if (index, number) == (0, 0) else "RGB"
            _write_jpeg(folder / "train" / wnid / "images" / name, 20 + 3 * (TRAIN_PER_CLASS * index + number), mode)
            labels["train"][name] = index
    lines = []
    for number in range(VAL_PER_CLASS * len(WNIDS)):
        name, index = f"val_{number}.JPEG", number % len(WNIDS)
        _write_jpeg(folder / "val" / "images" / name, 200 + 3 * number)
        lines.append(f"{name}\t{WNIDS[index]}\t0\t0\t63\t63\n")
        labels["test"][name] = index
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return labels


@pytest.fixture(scope="module")
def fake_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("tiny")
    return root, _write_tiny_imagenet(root)


def _labelled_names(split, root: Path) -> dict[str, int]:
    """{file name: class index} of a split's images, each found by its decoded pixels among the files'."""
    folder = root / "tiny-imagenet-200"
    names = {decode_image(path).numpy().tobytes(): path.name for path in folder.glob("*/**/*.JPEG")}
    return {names[image.numpy().tobytes()]: int(target) for image, target in zip(split.inputs, split.targets)}


def test_load_reads_the_on_disk_layout(fake_tiny) -> None:
    root, labels = fake_tiny
    bundle = DATASETS.get("tiny_imagenet")().load(root)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (27, 3, 6)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 64, 64)
    assert bundle.default_model == "resnet18_64" and bundle.fingerprint

    # Test split = the official val images, in annotation order, labelled by wnids.txt position.
    assert list(_labelled_names(bundle.test, root).items()) == list(labels["test"].items())
    # Val is carved from train (stratified: one image of each class), disjoint from train.
    train, val = _labelled_names(bundle.train, root), _labelled_names(bundle.val, root)
    assert not train.keys() & val.keys() and {**train, **val} == labels["train"]
    assert sorted(val.values()) == [0, 1, 2]


def test_images_are_decoded_to_normalised_rgb(fake_tiny) -> None:
    root, _ = fake_tiny
    bundle = DATASETS.get("tiny_imagenet")().load(root)
    image, target = bundle.test[4]  # val_4.JPEG, flat colour (212, 43, 128), class 1
    raw = (image * STD + MEAN).mul(255)
    assert int(target) == 1
    assert torch.allclose(raw.mean(dim=(1, 2)), torch.tensor([212.0, 43.0, 128.0]), atol=3)

    # The greyscale training file comes out as three equal channels (decoded without augmentation).
    grey_path = root / "tiny-imagenet-200" / "train" / "n09999999" / "images" / "n09999999_0.JPEG"
    assert Image.open(grey_path).mode == "L" and "n09999999_0.JPEG" in _labelled_names(bundle.train, root) | _labelled_names(bundle.val, root)
    grey = bundle.test.transform(decode_image(grey_path)[None])[0]
    raw = (grey * STD + MEAN).mul(255)
    assert grey.shape == (3, 64, 64)
    assert torch.allclose(raw[0], raw[1], atol=1) and torch.allclose(raw[1], raw[2], atol=1)
    assert torch.allclose(raw.mean(), torch.tensor(20.0), atol=3)


def test_loader_serves_augmented_training_batches(fake_tiny) -> None:
    root, _ = fake_tiny
    bundle = DATASETS.get("tiny_imagenet")().load(root)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = next(iter(bundle.loader("train", batch_size=8, shuffle=True, generator=generator)))
    assert inputs.shape == (8, 3, 64, 64) and inputs.dtype == torch.float32
    assert targets.shape == (8,) and targets.dtype == torch.int64
    inputs, targets = next(iter(bundle.loader("test", batch_size=6)))
    assert inputs.shape == (6, 3, 64, 64) and targets.tolist() == [0, 1, 2, 0, 1, 2]

    torch.manual_seed(0)
    draws = [bundle.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])  # random padded crops / flips
    torch.manual_seed(0)
    assert all(torch.equal(draw, bundle.train[0][0]) for draw in draws)  # ... drawn from the seeded RNG
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])  # no augmentation outside train


def test_split_is_identical_across_loads(fake_tiny) -> None:
    root, _ = fake_tiny
    plugin = DATASETS.get("tiny_imagenet")()
    first, second = plugin.load(root), plugin.load(root)
    assert first.fingerprint == second.fingerprint
    assert torch.equal(first.val.inputs, second.val.inputs) and torch.equal(first.train.inputs, second.train.inputs)


def test_fingerprint_follows_the_annotations(tmp_path: Path) -> None:
    labels_root, other_root = tmp_path / "a", tmp_path / "b"
    _write_tiny_imagenet(labels_root)
    _write_tiny_imagenet(other_root)
    plugin = DATASETS.get("tiny_imagenet")()
    assert plugin.load(labels_root).fingerprint == plugin.load(other_root).fingerprint  # paths are relative
    annotations = other_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace(WNIDS[0], WNIDS[1], 1))
    assert plugin.load(labels_root).fingerprint != plugin.load(other_root).fingerprint


@pytest.mark.parametrize("missing", ["", "wnids.txt", "train/n01443537/images", "val/images",
                                     "val/val_annotations.txt"])
def test_missing_part_names_path_and_fix(tmp_path: Path, missing: str) -> None:
    _write_tiny_imagenet(tmp_path)
    target = tmp_path / "tiny-imagenet-200" / missing
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(UserError) as info:
        DATASETS.get("tiny_imagenet")().load(tmp_path)
    assert str(target) in info.value.problem
    assert "jpqbench prepare --dataset tiny_imagenet" in info.value.fix
    assert "tiny-imagenet-200" in info.value.fix and str(tmp_path) in info.value.fix


def test_val_image_listed_but_missing(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    image = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG"
    image.unlink()
    with pytest.raises(UserError) as info:
        DATASETS.get("tiny_imagenet")().load(tmp_path)
    assert str(image) in info.value.problem and "val_annotations.txt" in info.value.problem


def test_prepare_skips_an_unzipped_copy(fake_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs) -> None:
        raise AssertionError("prepare downloaded although the data is there")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_network)
    DATASETS.get("tiny_imagenet")().prepare(fake_tiny[0])


def test_prepare_marks_a_complete_dataset_with_its_fingerprint(fake_tiny, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`jpqbench prepare` writes MANIFEST.json (the workflow's prepare output) after a full load."""
    import shutil

    root = tmp_path / "data" / "tiny_imagenet"
    shutil.copytree(fake_tiny[0], root)
    (tmp_path / "config.yaml").write_text(
        f"data_root: {tmp_path / 'data'}\nseeds: [0]\nbudgets: [0.1]\nmethods: [fp32]\n"
        "datasets: {tiny_imagenet: {models: {resnet18_64: {}}, pretrain_epochs: 1, epochs: 1, batch_size: 4, "
        "lr: 0.1, finetune_lr: 0.01}}\n")
    assert main(["--config", str(tmp_path / "config.yaml"), "prepare", "--dataset", "tiny_imagenet"]) == 0
    manifest = json.loads((root / "MANIFEST.json").read_text())
    bundle = DATASETS.get("tiny_imagenet")().load(root)
    assert manifest == {"dataset": "tiny_imagenet", "fingerprint": bundle.fingerprint,
                        "samples": {"train": 27, "val": 3, "test": 6}}


def test_failed_download_explains_manual_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as info:
        DATASETS.get("tiny_imagenet")().prepare(tmp_path)
    assert "download" in info.value.problem
    assert "tiny-imagenet-200" in info.value.fix and str(tmp_path) in info.value.fix
    assert "cs231n.stanford.edu/tiny-imagenet-200.zip" in info.value.fix
