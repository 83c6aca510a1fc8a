"""Random data augmentation on whole batches of tensors, on whatever device the batch is on.

Per-image transforms in a Python loop (torchvision's ``RandomCrop`` on one image at a time)
cost more than a small network's training step; the same augmentation done on a batch is a
handful of tensor operations, and runs on the GPU when the data lives there.

Every random draw is made on the CPU from torch's default generator and then moved to the
batch's device, so a seed gives the same augmentation on every device. The harness seeds that
generator for each batch from (run seed, phase, epoch, batch index) -- see
:meth:`jpqbench.harness.data.DataBundle.loader` -- so the draws do not depend on which process or
loader worker prepares the batch.
"""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.harness.data import host_to_device


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) cropped to (H, W) at a random offset of its copy
    zero-padded by ``padding`` on every side, then flipped left-right with probability 1/2 --
    torchvision's ``RandomCrop(size, padding=padding)`` + ``RandomHorizontalFlip()`` per image,
    done for the whole batch at once. Any dtype (uint8 images stay uint8)."""
    count, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, count))
    flips = torch.rand(count) < 0.5
    offsets, flips = host_to_device(offsets, images.device), host_to_device(flips, images.device)
    padded = nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(height, device=images.device)  # (N, H)
    columns = offsets[1][:, None] + torch.arange(width, device=images.device)  # (N, W)
    columns = torch.where(flips[:, None], columns.flip(1), columns)
    batch = torch.arange(count, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]


def random_shift_and_noise(waves: torch.Tensor, noise: torch.Tensor, noise_starts: torch.Tensor,
                           noise_lengths: torch.Tensor, max_shift: int, probability: float,
                           max_volume: float) -> torch.Tensor:
    """Keyword-spotting augmentation of float waveforms ``waves`` (N, T), as in the TensorFlow
    speech-commands reference: a random time shift of up to ``max_shift`` samples either way
    (zero fill), then, with ``probability``, a crop of a random background noise at a random
    offset, scaled by a volume uniform in [0, ``max_volume``), added; clipped to [-1, 1].

    The background noises are concatenated in ``noise`` (1-D); noise ``k`` starts at
    ``noise_starts[k]`` and is ``noise_lengths[k]`` >= T samples long (both CPU int64 tensors).
    """
    count, samples = waves.shape
    device = waves.device
    shifts = torch.randint(-max_shift, max_shift + 1, (count,))
    add = torch.rand(count) < probability
    which = torch.randint(len(noise_lengths), (count,))
    offsets = (torch.rand(count, dtype=torch.float64) * (noise_lengths[which] - samples + 1)).long()
    volumes = torch.rand(count) * max_volume * add
    shifts, starts, volumes = (host_to_device(t, device) for t in (shifts, noise_starts[which] + offsets, volumes))
    positions = torch.arange(samples, device=device)
    shifted = nn.functional.pad(waves, (max_shift, max_shift)).gather(1, positions + (max_shift - shifts)[:, None])
    crops = noise[starts[:, None] + positions]
    return (shifted + volumes[:, None] * crops).clamp_(-1.0, 1.0)


class ImageBatches(nn.Module):
    """uint8 (N, C, H, W) images -> normalised float32 model inputs (``(x / 255 - mean) / std``
    per channel); with ``padding``, each image is first randomly cropped from its zero-padded
    copy and flipped (:func:`random_crop_flip`) -- the standard CIFAR / Tiny ImageNet training
    augmentation. The transform of an in-memory image split, moved with it to the run's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int | None = None) -> None:
        super().__init__()
        self.padding = padding
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.padding is not None:
            images = random_crop_flip(images, self.padding)
        return (images.float() / 255 - self.mean) / self.std
