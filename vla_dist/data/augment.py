"""Training-time image augmentation.

`random_shift` is DrQ's shift (Kostrikov et al. 2020; also the crop of Diffusion Policy): each image
moves by up to `pad` pixels in x and y, the uncovered border repeating the edge pixels. With a few
hundred demonstrations a policy can memorize exact pixel positions; shifting the whole frame keeps
what matters for control (where the cube is relative to the gripper, both visible in the same frame)
and makes the memorized absolute positions unreliable. Applied in the trainer, on the batch, from a
generator seeded per micro-batch: a resumed run shifts exactly as the uninterrupted one would.

`color_jitter` scales each image's brightness, contrast and saturation by independent factors in
[1 - j, 1 + j] (torchvision's ColorJitter without hue; the perception recipes of docs/recipes.md):
lighting and camera exposure change between scenes and robots, the cube's colour relative to its
surroundings does not. `noise_state` adds Gaussian noise (raw units: m, rad) to the proprioception the
policy reads, so it cannot lean on an exact state it will not have on another embodiment (the
embodiment recipes). Both are drawn, like the shift, from the micro-batch's seeded generator.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

BatchT = TypeVar("BatchT")  # a PolicyBatch dataclass (or subclass: WindowBatch)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """images [..., H, W, C] (any dtype); each image shifted by an independent offset in [-pad, pad]
    along both axes, edge-replicated (indexing with clamped coordinates is replicate padding)."""
    if pad <= 0:
        return images
    *lead, height, width, channels = images.shape
    flat = images.reshape(-1, height, width, channels)
    n = flat.shape[0]
    dy = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    dx = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    rows = (torch.arange(height)[None, :] + dy).clamp_(0, height - 1)  # [n, H]
    cols = (torch.arange(width)[None, :] + dx).clamp_(0, width - 1)  # [n, W]
    index = torch.arange(n)[:, None, None]
    shifted = flat[index, rows[:, :, None], cols[:, None, :]]  # [n, H, W, C]
    return shifted.reshape(*lead, height, width, channels)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 images [..., H, W, 3]; each image's brightness, contrast and saturation scaled by its own
    factors drawn uniformly from [1 - strength, 1 + strength], applied in that order, clamped to 0..255."""
    if strength <= 0:
        return images
    *lead, height, width, channels = images.shape
    flat = images.reshape(-1, height, width, channels).float()
    n = flat.shape[0]

    def factors() -> torch.Tensor:
        return (1.0 + (torch.rand(n, 1, 1, 1, generator=generator) * 2.0 - 1.0) * strength)

    brightness, contrast, saturation = factors(), factors(), factors()
    flat = flat * brightness
    grey = flat @ _LUMA  # [n, H, W] ITU-R 601 luma, what "contrast" and "saturation" pivot on
    flat = (flat - grey.mean(dim=(1, 2)).reshape(n, 1, 1, 1)) * contrast + grey.mean(dim=(1, 2)).reshape(n, 1, 1, 1)
    grey = (flat @ _LUMA).unsqueeze(-1)
    flat = (flat - grey) * saturation + grey
    return flat.round_().clamp_(0, 255).to(images.dtype).reshape(*lead, height, width, channels)


_LUMA = torch.tensor([0.299, 0.587, 0.114])


def augment_batch(batch: BatchT, shift: int, seed: int, jitter: float = 0.0, state_noise: float = 0.0) -> BatchT:
    """The batch with its images shifted (`data.random_shift` pixels) and colour-jittered
    (`data.color_jitter`), its state noised (`data.state_noise`); actions and instructions untouched."""
    if shift <= 0 and jitter <= 0 and state_noise <= 0:
        return batch
    generator = torch.Generator().manual_seed(seed)
    images = color_jitter(random_shift(batch.images, shift, generator), jitter, generator)
    state = batch.state
    if state_noise > 0:
        state = state + torch.randn(state.shape, generator=generator) * state_noise
    return dataclasses.replace(batch, images=images, state=state)
