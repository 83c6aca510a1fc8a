"""The ImageNet plugin, on tiny datasets written in both layouts it reads.

* the ImageFolder tree ``train/<class>/*.JPEG`` + ``val/<class>/*.JPEG``;
* torchvision's unpacked layout: the same folders plus the ``meta.bin`` that
  ``torchvision.datasets.ImageNet`` writes from the devkit (a ``torch.save`` of
  ``(wnid -> class names, val wnids)``), read through torchvision's own ``ImageNet`` class.

Images are small JPEGs of odd sizes (the eval transform must resize and crop them to 224),
one greyscale and one CMYK, as ImageNet has a few of each. Class folders are wnids, so the
expected class index is the sorted position of the wnid.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: class index = position
TRAIN_PER_CLASS = 12  # 10 per class go to val, 2 stay in train
TEST_PER_CLASS = 2


def _write_jpeg(path: Path, index: int, number: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (40 + 7 * number, 30 + 5 * index)
    mode = "L" if (index, number) == (0, 0) else "CMYK" if (index, number) == (1, 0) else "RGB"
    colour = {"L": 90, "CMYK": (0, 50, 100, 0)}.get(mode, (30 * index, 10 * number, 200))
    Image.new(mode, size, colour).save(path, quality=90)


def _write_folder_tree(root: Path) -> dict[str, dict[str, int]]:
    """Write ``train/`` and ``val/`` and return {split: {relative path: class index}}."""
    labels: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for index, wnid in enumerate(WNIDS):
        for number in range(TRAIN_PER_CLASS):
            relative = f"train/{wnid}/{wnid}_{number}.JPEG"
            _write_jpeg(root / relative, index, number)
            labels["train"][relative] = index
        for number in range(TEST_PER_CLASS):
            relative = f"val/{wnid}/ILSVRC2012_val_{index * TEST_PER_CLASS + number:08d}.JPEG"
            _write_jpeg(root / relative, index, number + 1)
            labels["test"][relative] = index
    return labels


def _write_meta_bin(root: Path) -> None:
    names = {wnid: (f"thing {i}", f"other name {i}") for i, wnid in enumerate(WNIDS)}
    val_wnids = [wnid for wnid in WNIDS for _ in range(TEST_PER_CLASS)]
    torch.save((names, val_wnids), root / "meta.bin")


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict[str, int]]]:
    """Two roots with the same images: an ImageFolder tree, and torchvision's unpacked layout."""
    folder_root = tmp_path_factory.mktemp("imagefolder")
    labels = _write_folder_tree(folder_root)
    torchvision_root = tmp_path_factory.mktemp("torchvision")
    shutil.copytree(folder_root, torchvision_root, dirs_exist_ok=True)
    _write_meta_bin(torchvision_root)
    return folder_root, torchvision_root, labels


def _labelled(split, root: Path) -> dict[str, int]:
    return {path.relative_to(root).as_posix(): int(target) for path, target in zip(split.paths, split.targets)}


@pytest.mark.parametrize("layout", ["imagefolder", "torchvision"])
def test_load_reads_both_layouts(fake_imagenet, layout: str) -> None:
    folder_root, torchvision_root, labels = fake_imagenet
    root = folder_root if layout == "imagefolder" else torchvision_root
    bundle = DATASETS.get("imagenet")().load(root)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 30, 6)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 224, 224)
    assert bundle.default_model == "resnet18" and bundle.fingerprint

    # Test split = the official val folder; labels = sorted class folders.
    assert _labelled(bundle.test, root) == labels["test"]
    # Val = 10 training images of each class, disjoint from train; together all of train.
    train, val = _labelled(bundle.train, root), _labelled(bundle.val, root)
    assert not train.keys() & val.keys() and {**train, **val} == labels["train"]
    assert sorted(val.values()) == [0] * 10 + [1] * 10 + [2] * 10


def test_both_layouts_give_the_same_splits(fake_imagenet) -> None:
    folder_root, torchvision_root, _ = fake_imagenet
    plugin = DATASETS.get("imagenet")()
    first, second = plugin.load(folder_root), plugin.load(torchvision_root)
    assert first.fingerprint == second.fingerprint
    assert _labelled(first.val, folder_root) == _labelled(second.val, torchvision_root)


def test_split_is_identical_across_loads(fake_imagenet) -> None:
    folder_root, _, _ = fake_imagenet
    plugin = DATASETS.get("imagenet")()
    first, second = plugin.load(folder_root), plugin.load(folder_root)
    assert first.fingerprint == second.fingerprint
    assert first.val.paths == second.val.paths and first.train.paths == second.train.paths


def test_loader_serves_224_px_batches(fake_imagenet) -> None:
    folder_root, _, _ = fake_imagenet
    bundle = DATASETS.get("imagenet")().load(folder_root)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = next(iter(bundle.loader("train", batch_size=4, shuffle=True, generator=generator)))
    assert inputs.shape == (4, 3, 224, 224) and inputs.dtype == torch.float32
    assert targets.shape == (4,) and targets.dtype == torch.int64
    # Between them train and val hold every training file, the greyscale and the CMYK one included.
    for split, size in (("train", 6), ("val", 30)):
        inputs, _ = next(iter(bundle.loader(split, batch_size=size)))
        assert inputs.shape == (size, 3, 224, 224)
    inputs, targets = next(iter(bundle.loader("test", batch_size=6)))
    assert inputs.shape == (6, 3, 224, 224) and targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(bundle.test[0][0], bundle.test[0][0])  # no augmentation outside train


def test_missing_data_names_path_and_fix(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()  # train without val is not a layout
    for method in ("load", "prepare"):
        with pytest.raises(UserError) as info:
            getattr(DATASETS.get("imagenet")(), method)(tmp_path)
        assert str(tmp_path / "val") in info.value.problem and str(tmp_path / "meta.bin") in info.value.problem
        assert "ILSVRC2012_img_train.tar" in info.value.fix and "image-net.org" in info.value.fix
        assert "jpqbench prepare --dataset imagenet" in info.value.fix and str(tmp_path) in info.value.fix


def test_unpacked_folder_missing_next_to_meta_bin(tmp_path: Path) -> None:
    _write_meta_bin(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as info:
        DATASETS.get("imagenet")().load(tmp_path)
    assert str(tmp_path / "val") in info.value.problem and "jpqbench prepare" in info.value.fix


def test_archives_must_be_unpacked_by_prepare(tmp_path: Path) -> None:
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(UserError) as info:
        DATASETS.get("imagenet")().load(tmp_path)
    assert "not unpacked" in info.value.problem and "jpqbench prepare --dataset imagenet" in info.value.fix
    with pytest.raises(UserError) as info:  # prepare lets torchvision check the md5, which fails
        DATASETS.get("imagenet")().prepare(tmp_path)
    assert str(tmp_path) in info.value.problem and "image-net.org" in info.value.fix


def test_prepare_accepts_an_imagefolder_tree(fake_imagenet) -> None:
    folder_root, torchvision_root, _ = fake_imagenet
    DATASETS.get("imagenet")().prepare(folder_root)
    DATASETS.get("imagenet")().prepare(torchvision_root)  # already unpacked: torchvision does nothing


def test_too_few_training_images_per_class(tmp_path: Path) -> None:
    _write_folder_tree(tmp_path)
    (tmp_path / "train" / WNIDS[2] / f"{WNIDS[2]}_0.JPEG").unlink()
    (tmp_path / "train" / WNIDS[2] / f"{WNIDS[2]}_1.JPEG").unlink()
    with pytest.raises(UserError) as info:
        DATASETS.get("imagenet")().load(tmp_path)
    assert WNIDS[2] in info.value.problem and "10 per class" in info.value.problem
