"""Training's auxiliary perception target (`train.object_target`, the perception recipes): a small head
reads the policy's image tokens and predicts where the red cube is, and its error joins the action
loss, so the vision encoder is pushed to localize the object the task is about. Survey (Xiang et al.
2025, "enhancing environmental perception"): auxiliary visual targets during post-training.

Training only: the head is a submodule of the policy while it trains (so DeepSpeed shards, checkpoints
and resumes it with everything else), but `save_pretrained` writes the transformers model alone and
`vla-dist export` leaves the head's weights out (`OBJECT_HEAD`), so a saved policy, eval and RL never
see it. The targets are simulator state recorded at collection (`Episode.object_pos`), never inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OBJECT_HEAD = "object_head"  # the head's attribute on the policy, and its parameters' name prefix
# Targets in units of 10 cm around the table's workspace, so the regression is O(1) whatever the robot
WORKSPACE_CENTRE = (0.5, 0.0, 0.02)
WORKSPACE_SCALE = 0.1


class ObjectHead(nn.Module):
    """Image tokens [B, cameras, tokens, hidden] -> the cube's position [B, 3] (normalized units).

    Each camera's tokens are pooled by a learned attention (where in the image to look), the pooled
    features of all cameras go through a two-layer MLP. Its size does not grow with the number of
    tokens, so the same head fits the tiny and the full-size presets."""

    def __init__(self, hidden: int, n_cameras: int, weight: float, width: int = 128) -> None:
        super().__init__()
        self.weight = float(weight)
        self.score = nn.Linear(hidden, 1)
        self.mlp = nn.Sequential(nn.LayerNorm(n_cameras * hidden), nn.Linear(n_cameras * hidden, width), nn.GELU(),
                                 nn.Linear(width, 3))
        self.last_error_m = math.nan  # RMS distance (m) of the last batch's predictions: a training metric

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        tokens = image_tokens.to(self.score.weight.dtype)  # (DeepSpeed's bf16 casts the head too)
        attention = self.score(tokens).softmax(dim=2)  # [B, cameras, tokens, 1]
        pooled = (attention * tokens).sum(dim=2)  # [B, cameras, hidden]
        return self.mlp(pooled.flatten(1)).float()

    def loss(self, image_tokens: torch.Tensor, object_pos: torch.Tensor) -> torch.Tensor:
        """Mean squared error in normalized units against `object_pos` [B, 3] (m, world frame)."""
        target = normalized_position(object_pos.to(image_tokens.device))
        error = ((self(image_tokens) - target) ** 2).sum(dim=1)
        self.last_error_m = float(error.detach().mean().sqrt()) * WORKSPACE_SCALE
        return error.mean() / 3


def normalized_position(object_pos: torch.Tensor) -> torch.Tensor:
    centre = torch.tensor(WORKSPACE_CENTRE, dtype=torch.float32, device=object_pos.device)
    return (object_pos.float() - centre) / WORKSPACE_SCALE


def attach_object_head(policy: nn.Module, hidden: int, n_cameras: int, weight: float) -> ObjectHead:
    """Add the head to `policy` (before DeepSpeed wraps it): its forward then adds `weight` x the head's
    loss to the action loss (VLAPolicy.forward)."""
    head = ObjectHead(hidden, n_cameras, weight)
    policy.add_module(OBJECT_HEAD, head)
    return head


def without_object_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint's weights minus the head's: what a saved policy holds."""
    return {name: value for name, value in state.items() if not name.startswith(OBJECT_HEAD + ".")}
