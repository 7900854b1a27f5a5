"""Policy-gradient losses on per-sample log-probabilities (either family; see vla_dist/rl/flow_sde.py
for pi0's). Every function returns the scalar to minimize and float statistics for metrics.jsonl."""

from __future__ import annotations

import torch


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over samples:
    -mean(min(r A, clip(r, 1-clip, 1+clip) A)), r = exp(log_prob - old_log_prob); with `weights` [B],
    -mean(w * min(...)) (not renormalized per minibatch, so a weighting set over the whole iteration,
    e.g. rl.loss_weighting=episode, holds across its minibatches).
    Stats: clip_fraction (samples whose ratio left the band) and approx_kl (the k3 estimator,
    mean((r - 1) - log r), non-negative and unbiased for KL(old || new))."""
    if not (log_probs.shape == old_log_probs.shape == advantages.shape):
        raise ValueError(f"shapes differ: {log_probs.shape} {old_log_probs.shape} {advantages.shape}")
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if weights is not None and weights.shape != log_probs.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match the samples {tuple(log_probs.shape)}")
    log_ratio = log_probs - old_log_probs.detach()
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "approx_kl": float(((ratio - 1) - log_ratio).mean()),
        }
    if weights is not None:
        surrogate = surrogate * weights.detach().to(surrogate.dtype)
    return -surrogate.mean(), stats


def reference_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(policy || reference) on sampled decisions, by the k2 estimator mean(0.5 (log pi - log pi_ref)^2)
    (Schulman's "Approximating KL divergence"): its gradient, (log pi - log pi_ref) grad log pi, is the
    KL's on the policy's own samples, and unlike k3 (exp of the log-ratio) it cannot overflow when a
    log-probability sums many denoising steps. `weights` as in ppo_policy_loss."""
    if log_probs.shape != reference_log_probs.shape:
        raise ValueError(f"shapes differ: {log_probs.shape} {reference_log_probs.shape}")
    k2 = 0.5 * (log_probs - reference_log_probs.detach()) ** 2
    if weights is not None:
        k2 = k2 * weights.detach().to(k2.dtype)
    return k2.mean()


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None,
               clip: float | None = None) -> torch.Tensor:
    """0.5 * mean squared error of the value head against the GAE returns; with `clip`, PPO's clipped
    value loss (the larger of the clipped and unclipped errors)."""
    returns = returns.detach()
    error = (values - returns) ** 2
    if clip is not None:
        if old_values is None:
            raise ValueError("a clipped value loss needs old_values")
        old_values = old_values.detach()
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * error.mean()
