"""data.random_shift: every training image is the original moved by at most `pad` pixels with its
edges repeated, offsets differ between images and are reproducible from the seed; bad values fail
validation naming the key."""

from __future__ import annotations

import pytest
import torch

from vla_dist.cli import main
from vla_dist.data.augment import augment_batch, random_shift
from vla_dist.models.policy import PolicyBatch


def _reference_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) with replicate padding, the slow obvious way."""
    height, width = image.shape[:2]
    out = torch.empty_like(image)
    for y in range(height):
        for x in range(width):
            out[y, x] = image[min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)]
    return out


def test_each_image_is_a_shift_of_its_original() -> None:
    pad = 3
    images = torch.randint(0, 256, (4, 2, 12, 10, 3), dtype=torch.uint8)
    shifted = random_shift(images, pad, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    offsets = []
    for b in range(4):
        for c in range(2):
            found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                     if torch.equal(shifted[b, c], _reference_shift(images[b, c], dy, dx))]
            assert found, f"image {b},{c} is not a shift of at most {pad} px of its original"
            offsets.append(found[0])
    assert len(set(offsets)) > 1  # independent offsets per image, not one for the batch


def test_shift_is_seeded_and_zero_is_identity() -> None:
    images = torch.randint(0, 256, (8, 2, 16, 16, 3), dtype=torch.uint8)
    a = random_shift(images, 2, torch.Generator().manual_seed(7))
    b = random_shift(images, 2, torch.Generator().manual_seed(7))
    c = random_shift(images, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_shift(images, 0, torch.Generator()) is images


def test_augment_batch_changes_only_images() -> None:
    batch = PolicyBatch(images=torch.randint(0, 256, (6, 2, 16, 16, 3), dtype=torch.uint8),
                        state=torch.randn(6, 8), instructions=["pick"] * 6, actions=torch.randn(6, 4, 7),
                        action_mask=torch.ones(6, 4, dtype=torch.bool))
    out = augment_batch(batch, 4, seed=1)
    assert not torch.equal(out.images, batch.images)
    assert out.state is batch.state and out.actions is batch.actions and out.instructions is batch.instructions
    assert augment_batch(batch, 0, seed=1) is batch


@pytest.mark.parametrize("value", ["-1", "17"])  # quickstart images are 64 px: at most 16
def test_bad_random_shift_exits_2_naming_key(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", f"data.random_shift={value}"]) == 2
    assert "data.random_shift" in capsys.readouterr().err
