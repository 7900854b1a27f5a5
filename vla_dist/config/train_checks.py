"""Value rules for the `train` section (in `vla_dist.config.validate.CHECKS`): ranges, then the batch
arithmetic, rank resources, ZeRO offload and training-time eval rules, and `global_batch_size`, the
one place the effective batch is computed."""

from __future__ import annotations

from vla_dist.checkpoint_layout import is_complete
from vla_dist.config.cluster_checks import RESERVED_RESOURCES
from vla_dist.config.rules import Check, at_least, greater_than, in_range, one_of
from vla_dist.config.schema import RunConfig, TrainSection
from vla_dist.errors import ConfigError


def _train_resume(cfg: RunConfig) -> None:
    resume = cfg.train.resume
    if resume in ("auto", "never"):
        return
    if not is_complete(resume):
        raise ConfigError("train.resume", f"must be auto, never or a complete checkpoint directory "
                          f"(run.dir/checkpoints/step_N with a COMPLETE marker); got {resume!r}")


def global_batch_size(train: TrainSection) -> int:
    """Windows per optimizer step over all ranks: micro_batch_size * grad_accum * world_size; a set
    `train.global_batch_size` (0: derive it) must agree. The one place the rule lives: validation,
    the DeepSpeed config and the reports all call this."""
    t = train
    derived = t.micro_batch_size * t.grad_accum * t.world_size
    if t.global_batch_size and t.global_batch_size != derived:
        raise ConfigError("train.global_batch_size", f"must equal train.micro_batch_size * train.grad_accum * "
                          f"train.world_size = {t.micro_batch_size} * {t.grad_accum} * {t.world_size} = {derived} "
                          f"(or 0 to derive it); got {t.global_batch_size}")
    return derived


def _train_batch(cfg: RunConfig) -> None:
    global_batch_size(cfg.train)


def _train_rank_resources(cfg: RunConfig) -> None:
    for name, amount in cfg.train.rank_resources.items():
        if name in RESERVED_RESOURCES:  # Ray's own resources have their own keys
            raise ConfigError("train.rank_resources", f"{name!r} is Ray's own resource; use train.cpus_per_rank, "
                              "train.gpus_per_rank or train.memory_gb_per_rank")
        if not amount > 0:
            raise ConfigError("train.rank_resources", f"{name}: must be > 0, got {amount!r}")


def _train_object_target(cfg: RunConfig) -> None:
    if cfg.train.object_target <= 0:
        return
    if cfg.model.family != "pi0":
        raise ConfigError("train.object_target", f"the object head reads pi0's image tokens; the {cfg.model.family} "
                          "family's is not built")
    if cfg.train.fixed_batches:
        raise ConfigError("train.object_target", "needs the real data loader (its batches carry the object "
                          "positions): set train.fixed_batches=false")


def _train_offload(cfg: RunConfig) -> None:
    t = cfg.train
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError("train.offload_params", f"needs train.zero_stage=3, got stage {t.zero_stage}")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer", "needs train.zero_stage >= 1, got 0")


def _train_eval(cfg: RunConfig) -> None:
    t = cfg.train
    if t.keep_best and not t.eval_every:
        raise ConfigError("train.keep_best", "needs training-time evals to rank checkpoints: set train.eval_every > 0")
    if not t.eval_every or cfg.cluster.address is not None or cfg.cluster.num_cpus is None:
        return  # a cluster may autoscale; an in-process Ray of all CPUs is checked when it is up (sft._check_fits)
    need = t.world_size * t.cpus_per_rank + t.eval_actors * t.eval_cpus_per_actor
    if need > cfg.cluster.num_cpus:
        raise ConfigError("train.eval_actors", eval_fit_message(cfg, cfg.cluster.num_cpus))


def eval_fit_message(cfg: RunConfig, offered: float) -> str:
    t = cfg.train
    return (f"training-time evals need train.world_size * train.cpus_per_rank + train.eval_actors * "
            f"train.eval_cpus_per_actor = {t.world_size} * {t.cpus_per_rank:g} + {t.eval_actors} * "
            f"{t.eval_cpus_per_actor:g} CPUs, the in-process Ray (cluster.num_cpus) offers {offered:g}: lower "
            f"train.world_size, or give fractions of a CPU (train.cpus_per_rank, train.eval_cpus_per_actor; ranks "
            f"and eval actors then share cores and each runs slower), or set train.eval_every=0")


TRAIN_CHECKS: list[Check] = [
    at_least("train.steps", 1),
    at_least("train.world_size", 1),
    in_range("train.zero_stage", 0, 3),
    at_least("train.lora.r", 1),
    greater_than("train.lora.alpha", 0),
    in_range("train.lora.dropout", 0, 0.99),
    at_least("train.save_every", 0),
    _train_resume,
    at_least("train.micro_batch_size", 1),
    at_least("train.grad_accum", 1),
    at_least("train.global_batch_size", 0),
    greater_than("train.lr", 0),
    at_least("train.warmup_steps", 0),
    at_least("train.weight_decay", 0),
    at_least("train.grad_clip", 0),
    at_least("train.keep_last", 1),
    at_least("train.max_nan_steps", 1),
    at_least("train.log_every", 0),
    at_least("train.gpus_per_rank", 0),
    greater_than("train.cpus_per_rank", 0),
    one_of("train.placement_strategy", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")),
    at_least("train.memory_gb_per_rank", 0),
    _train_rank_resources,
    _train_batch,
    _train_offload,
    at_least("train.object_target", 0.0),
    _train_object_target,
    at_least("train.eval_every", 0),
    at_least("train.eval_episodes", 0),
    at_least("train.eval_actors", 1),
    greater_than("train.eval_cpus_per_actor", 0),
    _train_eval,
]
