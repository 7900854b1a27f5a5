"""Exploration for the action-token family: sample each action token at a temperature, restricted
to the 256 action tokens (the distribution `ActionTokenPolicy.log_prob` is defined over), and
recompute the chunk's log-probability under the current weights for PPO/GRPO ratios.

The behaviour distribution is softmax(logits / temperature); recomputation uses the same
temperature, so the ratio of a policy with itself is exactly 1 (RL4VLA and SimpleVLA-RL sample
OpenVLA's tokens the same way, temperature around 1.0-1.6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vla_dist.models.action_tokens import ActionTokenPolicy
    from vla_dist.models.policy import PolicyInputs


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy decoding is predict_chunk), got {temperature}")


@torch.no_grad()
def sample_bins(policy: ActionTokenPolicy, inputs: PolicyInputs, *, temperature: float,
                generator: torch.Generator | None = None,
                generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bins long [B, chunk, A], log_prob float32 [B]): one sampled chunk per row, token by token
    with the KV cache (predict_bins' loop with sampling in place of argmax). `generator` draws the
    batch's tokens from one stream; `generators` (one per row) instead: row i draws from generators[i]
    what it would draw sampled alone, so RL's envs sample in one batched forward per token and a
    row's chunk does not depend on the envs beside it."""
    _check_temperature(temperature)
    batch = policy.check_inputs(inputs)
    if generators is not None and len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}: give one per row")
    if generators is not None and generator is not None:  # which would draw is not obvious: refuse
        raise ValueError("give generator (the batch's stream) or generators (one per row), not both")
    prompt = policy.prepare_prompt(inputs)
    out = policy.hf_model(**prompt, use_cache=True, logits_to_keep=1)
    past, mask, position = out.past_key_values, prompt["attention_mask"], prompt["position_ids"][:, -1:]
    chosen: list[torch.Tensor] = []
    log_prob = torch.zeros(batch)
    for step in range(policy.num_action_tokens):
        logits = out.logits[:, -1].float().index_select(-1, policy.action_token_ids) / temperature
        logp = logits.log_softmax(-1).cpu()
        if generators is None:
            bins = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]  # [B]
        else:  # the forward is batched; each row's draw comes from its own stream
            bins = torch.cat([torch.multinomial(logp[row : row + 1].exp(), 1, generator=g)[:, 0]
                              for row, g in enumerate(generators)])
        log_prob += logp.gather(-1, bins[:, None])[:, 0]
        chosen.append(bins)
        if step == policy.num_action_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        position = position + 1
        out = policy.hf_model(input_ids=policy.action_token_ids[bins.to(policy.device)][:, None],
                              attention_mask=mask, position_ids=position, past_key_values=past,
                              use_cache=True, logits_to_keep=1)
        past = out.past_key_values
    return torch.stack(chosen, dim=1).reshape(batch, policy.chunk_size, policy.action_dim), log_prob


def bins_log_prob(policy: ActionTokenPolicy, inputs: PolicyInputs, bins: torch.Tensor, *,
                  temperature: float, valid_steps: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B] log-probability of `bins` [B, chunk, A] at `temperature`, teacher-forced with
    gradients (one forward). `valid_steps` [B, chunk] bool leaves out chunk steps never executed."""
    _check_temperature(temperature)
    logits = policy.action_logits(inputs, bins)  # [B, chunk * A, V]
    logp = (logits.index_select(-1, policy.action_token_ids) / temperature).log_softmax(-1)
    token_logp = logp.gather(-1, bins.reshape(bins.shape[0], -1, 1).to(logp.device))[..., 0]
    if valid_steps is not None:
        token_logp = token_logp * valid_steps.to(logp.device).repeat_interleave(policy.action_dim, dim=1)
    return token_logp.sum(dim=1)
