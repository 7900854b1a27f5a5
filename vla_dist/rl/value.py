"""PPO's critic: a small value head on the policy's own features (RLinf and RL4VLA found it cheaper
and as stable as a separate critic network). The head is a separate module (a model family knows
nothing of RL); `policy_features` reads what the backbone has already computed for the prompt.

Features, per family:
- pi0: the backbone's hidden states after its second-to-last layer, averaged over the valid prompt
  tokens. Not the last layer's output: pi0 reads only that layer's K/V, and its MLP and the final
  norm are frozen at their initialization (PI0Policy.discarded_parameters), so their output would
  be a fixed random function of the features.
- action tokens: the last hidden state at the last prompt position, the one that predicts the first
  action token.

`rl.value_inputs` may add (or use alone) the robot's whole state, standardized with the policy's
statistics: an asymmetric critic, as RLinf's state-based PPO has. What decides a pick is whether the
fingers closed on the cube (their opening stops at its width) and whether the hand rose with it; the
pooled prompt features did not tell a decision that will fail from one that will succeed (explained
variance near 0, docs/recipes.md), and a policy may read only part of the state (model.state_inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vla_dist.models.policy import PolicyInputs, VLAPolicy


def feature_size(policy: VLAPolicy) -> int:
    """Width of `policy_features` for this policy (the backbone's text hidden size)."""
    config = policy.hf_model.config
    text = config.vlm_config.text_config if policy.family == "pi0" else config.text_config
    return int(text.hidden_size)


def policy_features(policy: VLAPolicy, inputs: PolicyInputs) -> torch.Tensor:
    """float32 [B, feature_size(policy)] (module docstring), with gradients into the backbone."""
    if policy.family == "pi0":
        prefix = policy.prepare_prefix(inputs)  # type: ignore[attr-defined]
        inner = policy.inner_model()  # type: ignore[attr-defined]
        embeds = policy.prefix_embeddings(prefix)  # type: ignore[attr-defined]
        mask = prefix["attention_mask"]
        out = inner.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                        token_type_ids=torch.zeros_like(mask), output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-2].float()
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    prompt = policy.prepare_prompt(inputs)  # type: ignore[attr-defined]
    out = policy.hf_model(**prompt, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states[-1][:, -1].float()


STATE_CLIP = 5.0  # standard deviations: exploration may reach states the demonstrations' statistics never saw


def value_input_size(policy: VLAPolicy, names: list[str]) -> int:
    """Width of `value_inputs(policy, inputs, names)`."""
    return (feature_size(policy) if "features" in names else 0) + (policy.spec.state_dim if "state" in names else 0)


def value_inputs(policy: VLAPolicy, inputs: PolicyInputs, names: list[str]) -> torch.Tensor:
    """float32 [B, value_input_size]: the named inputs concatenated in a fixed order (features, state).
    The state is every dim, standardized and clipped at STATE_CLIP, whatever the policy itself reads."""
    parts = []
    if "features" in names:
        parts.append(policy_features(policy, inputs))
    if "state" in names:
        state = inputs.state.to(policy.state_mean.device, torch.float32)
        parts.append(((state - policy.state_mean) / policy.state_std).clamp(-STATE_CLIP, STATE_CLIP))
    return torch.cat(parts, dim=-1)


class ValueHead(nn.Module):
    """V(s) from `value_inputs`: LayerNorm -> Linear -> tanh -> Linear(1). The output layer starts at
    zero, so the first iteration's advantages are the plain returns (no random baseline)."""

    def __init__(self, features: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())[..., 0]
