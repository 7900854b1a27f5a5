"""What the RL ranks differentiate: `ActorCritic`, the policy and (PPO) its value head in one module
for DeepSpeed, returning each decision's log-probability under the current weights and its value.

A decision's log-probability counts only the chunk steps that ran in the simulator (`executed`): the
exploration noise of steps never executed changed nothing the reward saw, and summing it in would
only add variance to every ratio. Everything runs inside `forward`, so ZeRO-3 gathers the
parameters it needs as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from vla_dist.models.policy import PolicyInputs, VLAPolicy
from vla_dist.rl.flow_sde import SDESample, step_log_probs
from vla_dist.rl.value import ValueHead, value_inputs


@dataclass(frozen=True)
class Sampling:
    """The exploration the rollouts sampled with; recomputation must use the same."""

    noise_level: float  # pi0 Flow-SDE
    temperature: float  # action tokens


def token_step_log_probs(policy: VLAPolicy, inputs: PolicyInputs, bins: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, chunk], mean entropy per token [B]) of sampled `bins` [B, chunk, A] at `temperature`."""
    logits = policy.action_logits(inputs, bins)  # type: ignore[attr-defined]
    logp = (logits.index_select(-1, policy.action_token_ids).float() / temperature).log_softmax(-1)  # type: ignore[attr-defined]
    chosen = logp.gather(-1, bins.reshape(bins.shape[0], -1, 1).to(logp.device))[..., 0]
    entropy = -(logp.exp() * logp).sum(-1).mean(-1)
    return chosen.reshape(bins.shape).sum(-1), entropy


class Evaluation(NamedTuple):
    """What ActorCritic.forward computes for a batch of decisions."""

    log_prob: torch.Tensor  # [B], over the executed chunk steps
    whole: torch.Tensor  # [B], the whole chunk's (comparable with the sampling-time one)
    value: torch.Tensor | None  # [B] (PPO)
    entropy: torch.Tensor | None  # [B] (action tokens)
    value_inputs: torch.Tensor | None  # [B, F]: what the value head read (PPO), detached unless it trains the backbone


class ActorCritic(nn.Module):
    """policy + optional value head; forward -> Evaluation."""

    def __init__(self, policy: VLAPolicy, value_head: ValueHead | None, sampling: Sampling,
                 value_trains_backbone: bool = False, value_input_names: tuple[str, ...] = ("features",)) -> None:
        super().__init__()
        self.policy, self.value_head, self.sampling = policy, value_head, sampling
        self.value_trains_backbone = value_trains_backbone
        self.value_input_names = list(value_input_names)  # rl.value_inputs

    def forward(self, inputs: PolicyInputs, record: SDESample | torch.Tensor,
                executed: torch.Tensor) -> Evaluation:
        entropy = None
        if isinstance(record, SDESample):
            steps = step_log_probs(self.policy, inputs, record, self.sampling.noise_level)  # type: ignore[arg-type]
        else:
            steps, entropy = token_step_log_probs(self.policy, inputs, record, self.sampling.temperature)
        executed = executed.to(steps.device)
        log_prob = (steps * executed).sum(-1)
        value = features = None
        if self.value_head is not None:
            # Off by default: the critic's regression on a few dozen sparse returns would otherwise move
            # the backbone the actions are read from (rl.value_trains_backbone).
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.value_trains_backbone):
                features = value_inputs(self.policy, inputs, self.value_input_names)
            value = self.value_head(features)
        return Evaluation(log_prob, steps.sum(-1), value, entropy, features)
