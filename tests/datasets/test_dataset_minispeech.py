"""The minispeech plugin: an offline eSpeak NG build in the Speech Commands layout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS

CLIPS_PER_WORD = 8  # 80 keyword clips + 10 x 2 unknown clips: a build of about a second
KEYWORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")


def _folder(root: Path) -> Path:
    return root / "SpeechCommands" / "speech_commands_v0.02"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minispeech")
    DATASETS.get("minispeech")(clips_per_word=CLIPS_PER_WORD).prepare(root)
    return root


def test_class_attributes_match_speech_commands() -> None:
    mini, full = DATASETS.get("minispeech"), DATASETS.get("speech_commands")
    assert mini.embedded and not full.embedded
    for name in ("default_model", "num_classes", "input_shape"):
        assert getattr(mini, name) == getattr(full, name)


def test_layout_on_disk(root: Path) -> None:
    folder = _folder(root)
    words = sorted(path.name for path in folder.iterdir() if path.is_dir())
    assert set(KEYWORDS) < set(words) and "_background_noise_" in words and len(words) == 21
    for word in KEYWORDS:
        assert len(list((folder / word).glob("*_nohash_*.wav"))) == CLIPS_PER_WORD
    info = soundfile.info(next((folder / "yes").glob("*.wav")))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16_000, 1, 16_000, "PCM_16")
    assert list((folder / "_background_noise_").glob("*.wav"))
    listed = [line for name in ("validation_list.txt", "testing_list.txt")
              for line in (folder / name).read_text().splitlines()]
    assert listed and len(set(listed)) == len(listed) and all((folder / line).is_file() for line in listed)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    on_disk = sorted(path.relative_to(root).as_posix() for path in folder.rglob("*") if path.is_file())
    assert sorted(manifest["sha256"]) == on_disk


def test_build_is_deterministic(root: Path, tmp_path: Path) -> None:
    DATASETS.get("minispeech")(clips_per_word=CLIPS_PER_WORD).prepare(tmp_path)
    assert (tmp_path / "MANIFEST.json").read_bytes() == (root / "MANIFEST.json").read_bytes()


def test_distinct_words_give_distinct_audio(root: Path) -> None:
    folder = _folder(root)
    clips = {word: soundfile.read(next(iter(sorted((folder / word).glob("*.wav")))), dtype="int16")[0]
             for word in KEYWORDS}
    assert len({clip.tobytes() for clip in clips.values()}) == len(KEYWORDS)
    assert all(np.abs(clip).max() > 3000 for clip in clips.values())  # speech, not just the noise floor


def test_loads_through_the_speech_commands_reader(root: Path) -> None:
    bundle = DATASETS.get("minispeech")().load(root)
    assert bundle.name == "minispeech" and bundle.input_shape == (1, 49, 10) and bundle.num_classes == 12
    reader = sys.modules[DATASETS.get("speech_commands").__module__]
    assert isinstance(bundle.train.transform, reader.AugmentedFeatures)
    assert len(bundle.val) and len(bundle.test)
    assert torch.bincount(bundle.train.targets, minlength=12)[10:].min() > 0  # silence and unknown present
    direct = DATASETS.get("speech_commands")().load(root)
    assert torch.equal(direct.test.inputs, bundle.test.inputs) and direct.fingerprint == bundle.fingerprint


def test_missing_or_tampered_files_raise(root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        DATASETS.get("minispeech")().load(tmp_path)
    assert str(tmp_path / "MANIFEST.json") in error.value.problem
    assert "jpqbench prepare --dataset minispeech" in error.value.fix
    DATASETS.get("minispeech")(clips_per_word=2).prepare(tmp_path)
    clip = next((_folder(tmp_path) / "go").glob("*.wav"))
    clip.write_bytes(clip.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(UserError) as error:
        DATASETS.get("minispeech")().load(tmp_path)
    assert str(clip) in error.value.problem
