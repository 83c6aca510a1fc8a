"""Batched augmentation (jpqbench.harness.augment): the same transforms as the per-image references,
drawn from torch's CPU generator so a seed gives the same batch on every device."""
from __future__ import annotations

import torch
from simulated_gpu import simulated_gpu
from torchvision.transforms.v2 import functional as TF

from jpqbench.harness.augment import ImageBatches, random_crop_flip, random_shift_and_noise

PADDING = 4


def _candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every output torchvision's RandomCrop(padding) + RandomHorizontalFlip can give for ``image``."""
    height, width = image.shape[-2:]
    padded = TF.pad(image, [padding])
    crops = [TF.crop(padded, top, left, height, width)
             for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return crops + [TF.horizontal_flip(crop) for crop in crops]


def test_each_image_is_one_of_the_padded_crops_or_their_mirror_images() -> None:
    images = torch.randint(1, 256, (64, 3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = random_crop_flip(images, PADDING)
    assert out.shape == images.shape and out.dtype == torch.uint8
    picks = []
    for image, result in zip(images, out):
        matches = [k for k, candidate in enumerate(_candidates(image, PADDING)) if torch.equal(candidate, result)]
        assert matches, "an output is no crop of its own padded image"
        picks.append(matches[0])
    # the draws vary over the batch: many offsets, both orientations
    assert len(set(picks)) > 20 and {k >= 81 for k in picks} == {True, False}


def test_draws_follow_the_seed_and_are_the_same_on_the_gpu() -> None:
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(5)
    first = random_crop_flip(images, PADDING)
    torch.manual_seed(5)
    assert torch.equal(random_crop_flip(images, PADDING), first)
    transform = ImageBatches((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), padding=PADDING)
    torch.manual_seed(5)
    on_cpu = transform(images)
    with simulated_gpu():
        transform_gpu = ImageBatches((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), padding=PADDING).to("cuda")
        torch.manual_seed(5)
        on_gpu = transform_gpu(images.to("cuda"))
        assert on_gpu.device.type == "cuda"
        on_gpu = on_gpu.cpu()
    assert torch.equal(on_gpu, on_cpu)
    torch.testing.assert_close(on_cpu, (first.float() / 255 - 0.5) / 0.25)


def _shifted(wave: torch.Tensor, shift: int) -> torch.Tensor:
    out = torch.zeros_like(wave)
    if shift >= 0:
        out[shift:] = wave[:len(wave) - shift]
    else:
        out[:shift] = wave[-shift:]
    return out


def test_speech_shift_moves_the_clip_and_noise_is_a_crop_of_a_background() -> None:
    samples, shift = 100, 10
    waves = torch.linspace(-0.5, 0.5, samples).repeat(200, 1)
    noises = [torch.full((130,), 0.25), torch.full((170,), -0.25)]
    lengths = torch.tensor([len(n) for n in noises])
    torch.manual_seed(0)
    quiet = random_shift_and_noise(waves, torch.cat(noises), lengths.cumsum(0) - lengths, lengths, shift,
                                   probability=0.0, max_volume=0.1)
    offsets = set()
    for row in quiet:  # a copy of the clip shifted by at most `shift` samples, zero-filled
        matches = [s for s in range(-shift, shift + 1) if torch.equal(_shifted(waves[0], s), row)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10
    torch.manual_seed(0)
    noisy = random_shift_and_noise(waves, torch.cat(noises), lengths.cumsum(0) - lengths, lengths, shift,
                                   probability=1.0, max_volume=0.1)
    added = noisy - quiet  # a constant crop of one noise, scaled by a volume in [0, 0.1)
    assert torch.allclose(added, added[:, :1].expand_as(added), atol=1e-6)
    assert added.abs().max() <= 0.025 and (added[:, 0] > 0).any() and (added[:, 0] < 0).any()
