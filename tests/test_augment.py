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


def test_color_jitter_changes_colours_within_its_range_and_keeps_geometry() -> None:
    from vla_dist.data.augment import color_jitter

    # a flat grey image with one red square: jitter may change colours, never where things are
    images = torch.full((6, 2, 16, 16, 3), 120, dtype=torch.uint8)
    images[..., 4:8, 4:8, :] = torch.tensor([200, 30, 30], dtype=torch.uint8)
    out = color_jitter(images, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    means = out.float().mean(dim=(2, 3, 4)).flatten()
    assert len(set(means.tolist())) > 1  # each image its own factors
    for b in range(6):
        for c in range(2):
            inside = out[b, c, 4:8, 4:8].float().reshape(-1, 3)
            outside = out[b, c, 10:, 10:].float().reshape(-1, 3)
            assert (inside[:, 0] > inside[:, 1] + 40).all(), "the cube stays red, brighter in red than green"
            assert torch.equal(outside.min(0).values, outside.max(0).values), "the flat background stays flat"
    # brightness alone bounds the mean: strength 0.3 scales it by at most 1.3**3 (all three factors)
    assert means.max() <= images.float().mean() * 1.3 ** 3 + 1 and means.min() >= images.float().mean() * 0.7 ** 3 - 1
    assert color_jitter(images, 0.0, torch.Generator()) is images
    again = color_jitter(images, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_batch_noises_state_and_keeps_labels() -> None:
    batch = PolicyBatch(images=torch.randint(0, 256, (64, 2, 16, 16, 3), dtype=torch.uint8),
                        state=torch.zeros(64, 8), instructions=["pick"] * 64, actions=torch.randn(64, 4, 7),
                        action_mask=torch.ones(64, 4, dtype=torch.bool))
    out = augment_batch(batch, 0, seed=3, jitter=0.2, state_noise=0.01)
    assert not torch.equal(out.images, batch.images)
    assert abs(float(out.state.std()) - 0.01) < 0.002 and abs(float(out.state.mean())) < 0.002
    assert out.actions is batch.actions and out.action_mask is batch.action_mask
    assert out.instructions is batch.instructions
    same = augment_batch(batch, 0, seed=3, jitter=0.2, state_noise=0.01)
    assert torch.equal(out.images, same.images) and torch.equal(out.state, same.state)


@pytest.mark.parametrize(("key", "value"), [("data.color_jitter", "-0.1"), ("data.color_jitter", "1.5"),
                                            ("data.state_noise", "-1")])
def test_bad_jitter_or_state_noise_exits_2_naming_key(key: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", f"{key}={value}"]) == 2
    assert key in capsys.readouterr().err
