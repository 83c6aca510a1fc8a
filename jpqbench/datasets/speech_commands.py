"""Google Speech Commands v0.02 as the MLPerf Tiny 12-class keyword-spotting task.

The file index and the official splits come from ``torchaudio.datasets.SPEECHCOMMANDS``
(``validation_list.txt`` and ``testing_list.txt`` name the val and test clips; training is
every other clip). Only ``get_metadata`` is used: it returns a clip's relative path and label
without decoding, because ``torchaudio.load`` needs torchcodec and a system FFmpeg. The wavs
are read with ``soundfile``. torchaudio expects the tree at
``root/SpeechCommands/speech_commands_v0.02`` (the folder its download extracts into), so a
user who already has the dataset points ``root`` at the folder that holds ``SpeechCommands``.

Classes (MLPerf Tiny order): the ten keywords down, go, left, no, off, on, right, stop, up, yes,
then ``_silence_`` (10) and ``_unknown_`` (11, every other word).

Per split, as in the TensorFlow reference (``unknown_percentage = silence_percentage = 10``):

* ``_unknown_`` -- ``ceil(10 %)`` of the split's keyword-clip count (about one average keyword
  class), drawn without replacement from the split's non-keyword clips;
* ``_silence_`` -- as many clips again, each a 1 s crop at a random offset of a random
  ``_background_noise_`` wav at full volume (as tensorflow-datasets, which MLPerf Tiny reads,
  makes its silence class).

Both draws use the fixed seed ``(0, split code)`` -- not the run seed -- so every method and seed
sees the same clips.

Clips are zero-padded at the end (or cropped) to 1 s = 16,000 samples at 16 kHz. The front end
is ``torchaudio.transforms.MFCC``: 30 ms window (480 samples), 20 ms hop (320), 40 mel bands
20-4000 Hz, log mel magnitudes, 10 coefficients. ``center=False`` gives exactly
``1 + (16000 - 480) // 320 = 49`` frames (``center=True`` would pad and give 51), so one clip is
a (1, 49, 10) tensor: 49 frames x 10 coefficients. Features are standardised per coefficient
with the mean/std of the un-augmented training clips.

Val and test features are computed once at load. Training clips stay in memory as int16
waveforms and are augmented per batch as in the TensorFlow reference: a random time shift of
up to +/-100 ms (zero fill), then with probability 0.8 a random crop of a random background
noise wav scaled by U(0, 0.1) is added, then the waveform is clipped to [-1, 1]
(:func:`jpqbench.harness.augment.random_shift_and_noise`, on a whole batch, on the device the split
lives on; the draws come from torch's CPU generator, which the loader seeds per batch).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jpqbench import (
    DataBundle,
    DatasetPlugin,
    TensorSplit,
    UserError,
    fingerprint_tensors,
    random_shift_and_noise,
    register_dataset,
)

PREPARE_COMMAND = "jpqbench prepare --dataset speech_commands"
VERSION = "speech_commands_v0.02"
ARCHIVE_URL = f"http://download.tensorflow.org/data/{VERSION}.tar.gz"
FOLDER_IN_ARCHIVE = "SpeechCommands"  # torchaudio's fixed folder under root
NOISE_FOLDER = "_background_noise_"
LIST_FILES = ("validation_list.txt", "testing_list.txt")
KEYWORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = KEYWORDS + (SILENCE, UNKNOWN)
SUBSETS = {"training": 0, "validation": 1, "testing": 2}  # torchaudio's subset name -> split code
SPLIT_SEED = 0
UNKNOWN_FRACTION = 0.1  # of the split's keyword clips
SILENCE_FRACTION = 0.1  # of the split's keyword clips
SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
WINDOW, HOP = 480, 320  # 30 ms / 20 ms at 16 kHz
N_MELS, F_MIN, F_MAX, N_MFCC = 40, 20.0, 4000.0, 10
FRAMES = 1 + (CLIP_SAMPLES - WINDOW) // HOP  # 49 with center=False
MAX_SHIFT = SAMPLE_RATE // 10  # 100 ms
NOISE_PROBABILITY = 0.8
NOISE_VOLUME = 0.1
INT16_SCALE = 32768.0
FEATURE_CHUNK = 4096  # clips per MFCC call when precomputing, to bound memory

# torchaudio and soundfile are imported inside the functions that use them: every dataset
# plugin is imported whenever the registry is read, and these imports cost seconds.


def mfcc_transform() -> torch.nn.Module:
    """The DS-CNN front end (MLPerf Tiny settings): (..., 16000) waveform -> (..., 10, 49)."""
    from torchaudio.transforms import MFCC

    return MFCC(sample_rate=SAMPLE_RATE, n_mfcc=N_MFCC, log_mels=True,
                melkwargs={"n_fft": WINDOW, "win_length": WINDOW, "hop_length": HOP, "n_mels": N_MELS,
                           "f_min": F_MIN, "f_max": F_MAX, "center": False, "power": 1.0})


def _fix_length(samples: np.ndarray) -> np.ndarray:
    """Crop to 1 s, or zero-pad at the end (as the TensorFlow reference does)."""
    samples = samples[:CLIP_SAMPLES]
    return np.pad(samples, (0, CLIP_SAMPLES - len(samples)))


def _truncation(path: Path) -> str | None:
    """Why the wav at ``path`` is shorter than its RIFF header declares, or None.

    libsndfile reads a truncated wav without complaint (it returns the samples that are there),
    and a short clip is zero-padded to 1 s, so a truncated file would pass as a quiet clip.
    """
    with path.open("rb") as file:
        header = file.read(8)
    if len(header) < 8 or header[:4] != b"RIFF":
        return None  # not a RIFF header: soundfile judges the file
    declared, actual = int.from_bytes(header[4:], "little") + 8, path.stat().st_size
    return f"truncated: its header declares {declared} bytes, the file has {actual}" if actual < declared else None


def _read_wav(path: Path, root: Path) -> np.ndarray:
    """A 16 kHz mono wav as int16 samples; anything else (or a truncated file) is a corrupted dataset."""
    import soundfile

    truncated = _truncation(path)
    if truncated:
        raise _corrupted(path, root, truncated)
    try:
        samples, rate = soundfile.read(path, dtype="int16", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise _corrupted(path, root, str(exc)) from exc
    if rate != SAMPLE_RATE or samples.shape[1] != 1:
        raise _corrupted(path, root, f"{rate} Hz, {samples.shape[1]} channels; expected {SAMPLE_RATE} Hz mono")
    return samples[:, 0]


def _corrupted(path: Path, root: Path, why: str) -> UserError:
    return UserError(f"Speech Commands file {path} is unreadable ({why})",
                     f"replace the dataset under {root} (delete it and re-run `{PREPARE_COMMAND}`)")


def dataset_folder(root: Path) -> Path:
    """Where torchaudio looks for the extracted archive."""
    return Path(root) / FOLDER_IN_ARCHIVE / VERSION


def _check_layout(root: Path) -> Path:
    """The dataset folder, after checking that the parts the loader needs are there."""
    folder = dataset_folder(root)
    needed = [folder, *(folder / name for name in LIST_FILES), folder / NOISE_FOLDER]
    missing = [str(path) for path in needed if not path.exists()]
    if not missing and not any((folder / NOISE_FOLDER).glob("*.wav")):
        missing.append(str(folder / NOISE_FOLDER / "*.wav"))
    if missing:
        raise UserError(f"Speech Commands is not at {folder} (missing: {', '.join(missing)})",
                        f"run `{PREPARE_COMMAND}` on a machine with internet access, or download "
                        f"{ARCHIVE_URL} and extract it into {folder}")
    return folder


class AugmentedFeatures(nn.Module):
    """int16 (N, 16000) training clips -> standardised MFCCs of freshly augmented audio: the
    transform of the train :class:`TensorSplit`, moved with it to the run's device."""

    def __init__(self, noises: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("noise", torch.cat(noises))  # float32 background noises, each at least 1 s long
        lengths = torch.tensor([len(noise) for noise in noises])
        self.noise_lengths = lengths  # CPU tensors: the augmentation's draws are made on the CPU
        self.noise_starts = lengths.cumsum(0) - lengths
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.mfcc = mfcc_transform()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        waves = random_shift_and_noise(clips.float() / INT16_SCALE, self.noise, self.noise_starts,
                                       self.noise_lengths, MAX_SHIFT, NOISE_PROBABILITY, NOISE_VOLUME)
        return standardise(featurise(waves, self.mfcc), self.mean, self.std)


def featurise(waves: torch.Tensor, mfcc: torch.nn.Module) -> torch.Tensor:
    """float (N, 16000) waveforms -> (N, 1, 49, 10) MFCCs (frames x coefficients)."""
    return mfcc(waves).transpose(1, 2).unsqueeze(1).contiguous()


def standardise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-coefficient standardisation with the training statistics (broadcast over frames)."""
    return (features - mean) / std


def _features(waves: torch.Tensor, mfcc: torch.nn.Module) -> torch.Tensor:
    """Un-augmented MFCCs of int16 clips, computed in chunks to bound memory."""
    chunks = [featurise(waves[start:start + FEATURE_CHUNK].float() / INT16_SCALE, mfcc)
              for start in range(0, len(waves), FEATURE_CHUNK)]
    return torch.cat(chunks)  # never empty: _read_split refuses a split without keyword clips


def _silence(noises: list[np.ndarray], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` 1 s crops at random offsets of randomly chosen background noise wavs."""
    crops = []
    for _ in range(count):
        noise = noises[rng.integers(len(noises))]
        start = rng.integers(len(noise) - CLIP_SAMPLES + 1)
        crops.append(noise[start:start + CLIP_SAMPLES])
    return crops


def _read_split(root: Path, subset: str, noises: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """One official split as int16 (N, 16000) clips and int64 labels (see the module doc)."""
    from torchaudio.datasets import SPEECHCOMMANDS

    index = SPEECHCOMMANDS(root, url=VERSION, subset=subset)
    base = Path(root) / FOLDER_IN_ARCHIVE  # get_metadata's paths are relative to it
    keyword, unknown = [], []
    for n in range(len(index)):
        relpath, _, label, *_ = index.get_metadata(n)
        (keyword if label in KEYWORDS else unknown).append((relpath, label))
    if not keyword:
        raise UserError(f"the {subset} split of {dataset_folder(root)} holds no keyword clips",
                        f"check its {' and '.join(LIST_FILES)} (or delete it and re-run `{PREPARE_COMMAND}`)")
    rng = np.random.default_rng([SPLIT_SEED, SUBSETS[subset]])
    n_unknown = min(len(unknown), math.ceil(UNKNOWN_FRACTION * len(keyword)))
    chosen = sorted(rng.choice(len(unknown), size=n_unknown, replace=False).tolist())
    clips = keyword + [(unknown[i][0], UNKNOWN) for i in chosen]
    waves = [_fix_length(_read_wav(base / relpath, root)) for relpath, _ in clips]
    labels = [LABELS.index(label) for _, label in clips]
    n_silence = math.ceil(SILENCE_FRACTION * len(keyword))
    waves += _silence(noises, n_silence, rng)
    labels += [LABELS.index(SILENCE)] * n_silence
    return torch.from_numpy(np.stack(waves)), torch.tensor(labels, dtype=torch.int64)


def _read_noises(folder: Path, root: Path) -> list[np.ndarray]:
    """The background noise wavs (int16), each at least 1 s long (shorter ones are padded)."""
    paths = sorted((folder / NOISE_FOLDER).glob("*.wav"))
    return [np.pad(samples, (0, max(0, CLIP_SAMPLES - len(samples))))
            for samples in (_read_wav(path, root) for path in paths)]


@register_dataset("speech_commands")
class SpeechCommands(DatasetPlugin):
    """Speech Commands v0.02, 12 classes, (1, 49, 10) MFCCs; training clips augmented per batch."""

    default_model = "ds_cnn"
    embedded = False
    num_classes = len(LABELS)
    input_shape = (1, FRAMES, N_MFCC)
    # v0.02's keyword clips in training / validation_list / testing_list (30,769 / 3,703 / 4,074), each plus
    # ceil(10 %) unknown and as many silence clips (_read_split): the 36,923 / 4,445 / 4,890 usually cited
    split_samples = {"train": 36_923, "val": 4_445, "test": 4_890}

    def prepare(self, root: Path) -> None:
        """Download and extract the archive through torchaudio (skipped when the folder exists)."""
        from torchaudio.datasets import SPEECHCOMMANDS

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            SPEECHCOMMANDS(root, url=VERSION, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad checksum a RuntimeError
            raise UserError(f"downloading Speech Commands into {root} failed: {exc}",
                            f"download {ARCHIVE_URL} on a machine with internet access and extract it "
                            f"into {dataset_folder(root)}") from exc

    def load(self, root: Path) -> DataBundle:
        """Read the three official splits, precompute val/test MFCCs, augment train per batch."""
        root = Path(root)
        folder = _check_layout(root)
        noises = _read_noises(folder, root)
        splits = {subset: _read_split(root, subset, noises) for subset in SUBSETS}
        mfcc = mfcc_transform()
        train_waves, train_targets = splits["training"]
        train_features = _features(train_waves, mfcc)
        mean = train_features.mean(dim=(0, 1, 2))
        std = train_features.std(dim=(0, 1, 2))

        def fixed(subset: str) -> TensorSplit:
            waves, targets = splits[subset]
            return TensorSplit(standardise(_features(waves, mfcc), mean, std), targets)

        noise_tensors = [torch.from_numpy(noise).float() / INT16_SCALE for noise in noises]
        return DataBundle(
            name="speech_commands",
            train=TensorSplit(train_waves, train_targets, AugmentedFeatures(noise_tensors, mean, std)),
            val=fixed("validation"),
            test=fixed("testing"),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            default_model=self.default_model,
            fingerprint=fingerprint_tensors(*(t for pair in splits.values() for t in pair),
                                            *(torch.from_numpy(noise) for noise in noises)),
        )
