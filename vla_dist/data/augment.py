"""Training-time image augmentation.

`random_shift` is DrQ's shift (Kostrikov et al. 2020; also the crop of Diffusion Policy): each image
moves by up to `pad` pixels in x and y, the uncovered border repeating the edge pixels. With a few
hundred demonstrations a policy can memorize exact pixel positions; shifting the whole frame keeps
what matters for control (where the cube is relative to the gripper, both visible in the same frame)
and makes the memorized absolute positions unreliable. Applied in the trainer, on the batch, from a
generator seeded per micro-batch: a resumed run shifts exactly as the uninterrupted one would.
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


def augment_batch(batch: BatchT, shift: int, seed: int) -> BatchT:
    """The batch with its images shifted (`data.random_shift` pixels); other fields untouched."""
    if shift <= 0:
        return batch
    generator = torch.Generator().manual_seed(seed)
    return dataclasses.replace(batch, images=random_shift(batch.images, shift, generator))
