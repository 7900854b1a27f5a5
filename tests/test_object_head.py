"""Training's object head (models/object_head.py, train.object_target) on a real tiny pi0: what its loss
adds, that it trains the vision encoder, that it locates an object it was never shown, and that it
never reaches a saved policy. Its run under DeepSpeed (ZeRO-3, export) is in tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.data.collate import WindowBatch
from vla_dist.errors import ConfigError
from vla_dist.models.build import load_policy
from vla_dist.models.object_head import (
    OBJECT_HEAD,
    WORKSPACE_CENTRE,
    WORKSPACE_SCALE,
    attach_object_head,
    without_object_head,
)
from vla_dist.models.policy import VLAPolicy

from .test_models import IMAGE_SIZE, build, make_batch

TRAIN, HELD, BATCH, STEPS = 160, 32, 32, 250


def with_positions(policy: VLAPolicy, object_pos: torch.Tensor, images: torch.Tensor | None = None,
                   seed: int = 1) -> WindowBatch:
    batch = make_batch(policy, size=object_pos.shape[0], seed=seed)
    return WindowBatch(images=batch.images if images is None else images, state=batch.state,
                       instructions=batch.instructions, actions=batch.actions, action_mask=batch.action_mask,
                       episode_ids=[f"e{i}" for i in range(object_pos.shape[0])],
                       timesteps=torch.zeros(object_pos.shape[0], dtype=torch.int64), object_pos=object_pos)


def attached(policy: VLAPolicy, weight: float):
    hidden = policy.hf_model.config.vlm_config.text_config.hidden_size
    return attach_object_head(policy, hidden, len(policy.cameras), weight)


def test_the_heads_loss_joins_the_action_loss_and_trains_the_vision_encoder() -> None:
    policy = build("pi0")
    head = attached(policy, weight=2.5)
    batch = with_positions(policy, torch.tensor([[0.55, 0.05, 0.02], [0.45, -0.1, 0.02], [0.6, 0.0, 0.1]]))
    torch.manual_seed(3)
    total = policy(batch)
    torch.manual_seed(3)
    action = policy.compute_loss(batch)  # the same noise and flow time
    embeds = policy.prefix_embeddings(policy.prepare_prefix(batch))
    n = len(policy.cameras) * policy.tokens_per_image
    tokens = embeds[:, :n].reshape(3, len(policy.cameras), policy.tokens_per_image, -1)
    aux = head.loss(tokens, batch.object_pos)
    torch.testing.assert_close(total, action + 2.5 * aux)
    assert aux > 0 and head.last_error_m > 0

    policy.zero_grad()
    aux.backward()  # the head's loss alone
    vision = [p.grad for name, p in policy.hf_model.named_parameters() if "vision" in name]
    assert vision and sum(float(g.abs().sum()) for g in vision if g is not None) > 0
    assert all(p.grad is not None for p in head.parameters())

    with pytest.raises(ValueError, match="object positions"):
        policy(make_batch(policy, size=2))  # a batch without targets is an error, never a silent 0


def square_images(corners: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 2, H, W, 3]: grey with a red 12 px square at `corners` [B, 2] (pixels) in the front camera;
    the wrist camera shows grey alone."""
    size = corners.shape[0]
    images = torch.full((size, 2, IMAGE_SIZE, IMAGE_SIZE, 3), 110, dtype=torch.uint8)
    for i, (row, col) in enumerate(corners.tolist()):
        images[i, 0, row : row + 12, col : col + 12] = torch.tensor([220, 20, 20], dtype=torch.uint8)
    return images


def test_the_head_locates_an_object_in_images_it_never_saw() -> None:
    """Trained (head and policy) on 160 images of a red square with its place as the target, the head
    predicts the place in 32 other images much better than the best constant guess (the training
    targets' mean) does: the image tokens it reads carry where the object is, and it reads them.
    Measured: ~3.6 cm against 8.1 cm (the 4 x 4 patch grid of tiny-pi0 limits it)."""
    torch.manual_seed(0)
    policy = build("pi0")
    head = attached(policy, weight=1.0)
    gen = torch.Generator().manual_seed(4)
    corners = torch.randint(0, IMAGE_SIZE - 12, (TRAIN + HELD, 2), generator=gen)
    # the square's place as a position on the table: one image axis per horizontal axis, z fixed
    centre = torch.tensor(WORKSPACE_CENTRE)
    positions = centre + WORKSPACE_SCALE * torch.cat(
        ((corners.float() / (IMAGE_SIZE - 12)) * 2 - 1, torch.zeros(TRAIN + HELD, 1)), dim=1)
    images = square_images(corners)
    train, held = slice(0, TRAIN), slice(TRAIN, TRAIN + HELD)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)

    def tokens(picked: slice) -> torch.Tensor:
        batch = with_positions(policy, positions[picked], images[picked])
        embeds = policy.prefix_embeddings(policy.prepare_prefix(batch))
        n = len(policy.cameras) * policy.tokens_per_image
        return embeds[:, :n].reshape(embeds.shape[0], len(policy.cameras), policy.tokens_per_image, -1)

    for step in range(STEPS):
        first = BATCH * step % TRAIN
        picked = slice(first, first + BATCH)
        loss = head.loss(tokens(picked), positions[picked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.loss(tokens(held), positions[held])
    constant = float((positions[held] - positions[train].mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())
    assert head.last_error_m < 0.6 * constant, (head.last_error_m, constant)


def test_a_saved_policy_holds_no_head(tmp_path: Path) -> None:
    policy = build("pi0")
    attached(policy, weight=1.0)
    state = policy.state_dict()
    assert any(name.startswith(OBJECT_HEAD + ".") for name in state)
    assert not any(name.startswith(OBJECT_HEAD + ".") for name in without_object_head(state))
    policy.save_pretrained(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert OBJECT_HEAD not in loaded._modules
    assert all(torch.equal(p, dict(policy.hf_model.named_parameters())[name])
               for name, p in loaded.hf_model.named_parameters())


def test_object_target_config_is_checked_with_its_key() -> None:
    for overrides in (["train.object_target=-1"],
                      ["train.object_target=1", "model.preset=tiny-openvla", "model.family=action_tokens"],
                      ["train.object_target=1", "train.fixed_batches=true"]):
        with pytest.raises(ConfigError, match=r"train\.object_target"):
            validate(load_config(None, overrides))
    assert validate(load_config(None, ["train.object_target=1"])).train.object_target == 1.0
