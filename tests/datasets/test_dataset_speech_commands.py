"""The speech_commands plugin on a tiny fixture in the exact Speech Commands v0.02 layout."""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile
import torch

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS

KEYWORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
OTHERS = ("cat", "dog")
SPEAKERS = ("aa000001", "bb000002", "cc000003", "dd000004", "ee000005")
VAL_SPEAKER, TEST_SPEAKER = SPEAKERS[1], SPEAKERS[2]  # the other three are training speakers


def _module() -> ModuleType:
    return sys.modules[DATASETS.get("speech_commands").__module__]


def _tone(word_index: int, speaker_index: int) -> np.ndarray:
    """A distinct int16 tone per clip; lengths vary around 1 s to exercise padding and cropping."""
    length = 12_000 + 2_000 * speaker_index  # 0.75 s .. 1.25 s
    seconds = np.arange(length) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * word_index + 20 * speaker_index) * seconds)
    return (tone * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speech_commands")
    folder = root / "SpeechCommands" / "speech_commands_v0.02"
    val_list, test_list = [], []
    for w, word in enumerate(KEYWORDS + OTHERS):
        (folder / word).mkdir(parents=True)
        for s, speaker in enumerate(SPEAKERS):
            relpath = f"{word}/{speaker}_nohash_0.wav"
            soundfile.write(folder / relpath, _tone(w, s), 16_000, subtype="PCM_16")
            {VAL_SPEAKER: val_list, TEST_SPEAKER: test_list}.get(speaker, []).append(relpath)
    (folder / "validation_list.txt").write_text("".join(f"{p}\n" for p in val_list))
    (folder / "testing_list.txt").write_text("".join(f"{p}\n" for p in test_list))
    (folder / "_background_noise_").mkdir()
    noise = (np.random.default_rng(1).uniform(-0.5, 0.5, 48_000) * 32767).astype(np.int16)
    soundfile.write(folder / "_background_noise_" / "noise.wav", noise, 16_000, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def bundle(root: Path):
    return DATASETS.get("speech_commands")().load(root)


def test_class_attributes_and_shapes(bundle) -> None:
    plugin = DATASETS.get("speech_commands")
    assert (plugin.num_classes, plugin.input_shape, plugin.default_model, plugin.embedded) == \
        (12, (1, 49, 10), "ds_cnn", False)
    assert bundle.num_classes == 12 and bundle.input_shape == (1, 49, 10) and len(bundle.fingerprint) == 16
    assert bundle.val.inputs.shape[1:] == (1, 49, 10) and bundle.val.inputs.dtype == torch.float32
    inputs, targets = next(iter(bundle.loader("train", batch_size=8, shuffle=True,
                                              generator=torch.Generator().manual_seed(0))))
    assert inputs.shape == (8, 1, 49, 10) and inputs.dtype == torch.float32 and targets.dtype == torch.int64


def test_frontend_gives_exactly_49_frames() -> None:
    module = _module()
    assert module.featurise(torch.zeros(2, 16_000), module.mfcc_transform()).shape == (2, 1, 49, 10)


def test_label_mapping() -> None:
    assert _module().LABELS == KEYWORDS + ("_silence_", "_unknown_")


def test_splits_follow_the_list_files_with_unknown_and_silence(bundle) -> None:
    # Per split: one clip per keyword and speaker; unknown = silence = ceil(10 % of the keyword clips).
    keyword_clips = {"train": 30, "val": 10, "test": 10}
    for name, per_word in (("train", 3), ("val", 1), ("test", 1)):
        extra = int(np.ceil(0.1 * keyword_clips[name]))
        counts = torch.bincount(getattr(bundle, name).targets, minlength=12).tolist()
        assert counts == [per_word] * 10 + [extra, extra], name


def test_each_split_holds_the_listed_speakers(root: Path, bundle) -> None:
    module = _module()
    folder = root / "SpeechCommands" / "speech_commands_v0.02"
    mfcc = module.mfcc_transform()
    for name, speaker in (("val", VAL_SPEAKER), ("test", TEST_SPEAKER)):
        split = getattr(bundle, name)
        for label, word in enumerate(KEYWORDS):
            wave = module._fix_length(soundfile.read(folder / word / f"{speaker}_nohash_0.wav", dtype="int16")[0])
            expected = module.standardise(module.featurise(torch.from_numpy(wave)[None].float() / 32768, mfcc),
                                          bundle.train.transform.mean, bundle.train.transform.std)
            torch.testing.assert_close(split.inputs[split.targets == label], expected)
    train_waves = {bytes(row.numpy()) for row in bundle.train.inputs[bundle.train.targets < 10]}
    expected = {bytes(module._fix_length(_tone(w, s))) for w in range(10) for s in (0, 3, 4)}
    assert train_waves == expected


def test_silence_is_cut_from_the_background_noise(root: Path, bundle) -> None:
    noise = soundfile.read(root / "SpeechCommands" / "speech_commands_v0.02" / "_background_noise_" / "noise.wav",
                           dtype="int16")[0]
    silence = bundle.train.inputs[bundle.train.targets == 10].numpy()
    windows = np.lib.stride_tricks.sliding_window_view(noise, 16_000)
    for row in silence:
        assert (windows == row).all(axis=1).any()


def test_unknown_comes_from_other_words(root: Path, bundle) -> None:
    others = {bytes(_module()._fix_length(_tone(w, s))) for w in (10, 11) for s in (0, 3, 4)}
    unknown = bundle.train.inputs[bundle.train.targets == 11]
    assert {bytes(row.numpy()) for row in unknown} <= others


def test_augmentation_changes_train_but_not_test(root: Path, bundle) -> None:
    indices = list(range(len(bundle.train)))
    torch.manual_seed(0)
    first, _ = bundle.train.__getitems__(indices)
    torch.manual_seed(0)
    again, _ = bundle.train.__getitems__(indices)
    torch.manual_seed(1)
    other, _ = bundle.train.__getitems__(indices)
    assert torch.equal(first, again) and not torch.equal(first, other)
    reloaded = DATASETS.get("speech_commands")().load(root)
    assert torch.equal(reloaded.test.inputs, bundle.test.inputs)
    assert reloaded.fingerprint == bundle.fingerprint


def test_missing_folder_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        DATASETS.get("speech_commands")().load(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "SpeechCommands" / "speech_commands_v0.02") in error.value.problem
    assert "jpqbench prepare --dataset speech_commands" in error.value.fix
