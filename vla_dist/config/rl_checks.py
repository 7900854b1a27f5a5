"""Value rules for the `rl` section (appended to `vla_dist.config.validate.CHECKS`), and how its 0
defaults resolve. Plain functions on the RunConfig: no torch, no Ray."""

from __future__ import annotations

from vla_dist.checkpoint_layout import is_complete
from vla_dist.config.rules import Check, at_least, greater_than, in_range, one_of
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

VALUE_INPUTS = ("features", "state")  # what rl.value_inputs may name (vla_dist/rl/value.py)


def _rl_resume(cfg: RunConfig) -> None:
    resume = cfg.rl.resume
    if resume not in ("auto", "never") and not is_complete(resume):
        raise ConfigError("rl.resume", f"must be auto, never or a complete checkpoint directory "
                          f"(run.dir/checkpoints/step_N with a COMPLETE marker); got {resume!r}")


def rl_exploration_steps(cfg: RunConfig) -> tuple[int, int]:
    """(horizon, sde_step) with rl's 0 defaults resolved: the whole chunk, the middle denoising step."""
    steps = cfg.model.num_inference_steps
    return cfg.rl.horizon or cfg.model.chunk_size, cfg.rl.sde_step or max(1, steps // 2)


def _rl_sampling(cfg: RunConfig) -> None:
    rl = cfg.rl
    if rl.algorithm == "grpo":
        if rl.group_size < 2:
            raise ConfigError("rl.group_size", f"GRPO compares rollouts of one layout: needs >= 2, got {rl.group_size}")
        if rl.episodes_per_iteration % rl.group_size:
            raise ConfigError("rl.episodes_per_iteration", f"GRPO: must be a multiple of rl.group_size "
                              f"({rl.group_size}), got {rl.episodes_per_iteration}")
    if rl.critic_warmup and rl.algorithm != "ppo":
        raise ConfigError("rl.critic_warmup", f"only PPO has a value head to warm up; rl.algorithm={rl.algorithm}")
    if rl.critic_warmup >= rl.iterations:
        raise ConfigError("rl.critic_warmup", f"must be < rl.iterations ({rl.iterations}), or the policy never "
                          f"updates; got {rl.critic_warmup}")
    if rl.horizon > cfg.model.chunk_size:
        raise ConfigError("rl.horizon", f"a decision executes at most one chunk: must be <= model.chunk_size "
                          f"({cfg.model.chunk_size}), got {rl.horizon}")
    if rl.value_epochs:
        why = ""
        if rl.algorithm != "ppo":
            why = "only PPO has a value head"
        elif not rl.value_lr:
            why = "the head is fitted at rl.value_lr while the policy's learning rate is held at 0: set rl.value_lr > 0"
        elif rl.value_trains_backbone:
            why = "the fit reads detached inputs; with rl.value_trains_backbone the value loss trains the backbone"
        if why:
            raise ConfigError("rl.value_epochs", f"{why} (got rl.value_epochs={rl.value_epochs})")
    inputs = list(rl.value_inputs)
    if not inputs or len(set(inputs)) != len(inputs) or not set(inputs) <= set(VALUE_INPUTS):
        raise ConfigError("rl.value_inputs", f"a non-empty list of distinct names from {list(VALUE_INPUTS)}, "
                          f"got {inputs}")
    if cfg.eval.seeds == "rl" and not rl.layouts:
        raise ConfigError("eval.seeds", "eval.seeds=rl scores the pool of layouts an RL run practised: give its "
                          "rl.layouts (> 0), the run's own")
    steps = cfg.model.num_inference_steps
    if cfg.model.family == "pi0" and rl.sde_step and not 1 <= rl.sde_step < steps:
        raise ConfigError("rl.sde_step", f"must lie in 1..model.num_inference_steps-1 = 1..{steps - 1} "
                          f"(t=1 has infinite noise), got {rl.sde_step}")
    if rl.sde_every_step and (rl.sde_step or rl.random_sde_step):
        raise ConfigError("rl.sde_every_step", "makes every denoising step stochastic: leave rl.sde_step at 0 and "
                          f"rl.random_sde_step false (got {rl.sde_step}, {rl.random_sde_step})")


RL_CHECKS: list[Check] = [
    at_least("rl.iterations", 1),
    one_of("rl.algorithm", ("ppo", "grpo")),
    one_of("rl.loss_weighting", ("decision", "episode")),
    at_least("rl.episodes_per_iteration", 1),
    at_least("rl.layouts", 0),
    at_least("rl.group_size", 1),
    at_least("rl.horizon", 0),
    at_least("rl.sde_step", 0),
    greater_than("rl.noise_level", 0),
    greater_than("rl.temperature", 0),
    at_least("rl.temporal_ensemble", 0),
    greater_than("rl.lr", 0),
    at_least("rl.epochs", 1),
    at_least("rl.minibatch_size", 1),
    greater_than("rl.clip", 0),
    at_least("rl.target_kl", 0),
    at_least("rl.kl_coef", 0),
    at_least("rl.critic_warmup", 0),
    at_least("rl.value_coef", 0),
    at_least("rl.value_lr", 0),
    at_least("rl.value_epochs", 0),
    in_range("rl.gamma", 0, 1),
    in_range("rl.gae_lambda", 0, 1),
    at_least("rl.shaped_reward", 0),
    at_least("rl.save_every", 0),
    at_least("rl.keep_last", 1),
    at_least("rl.eval_every", 0),
    at_least("rl.eval_episodes", 0),
    greater_than("rl.sync_timeout_s", 0),
    _rl_resume,
    _rl_sampling,
]
