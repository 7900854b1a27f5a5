"""Value rules the type system cannot express: ranges, choices, cross-field constraints.

`CHECKS` is a flat list of small checks run in order; each raises ConfigError naming the full key,
the bad value and what is allowed. A new section adds its rules by appending to the list (built
from the helpers in rules.py, or a plain function taking the RunConfig; cluster_checks.py and
rl_checks.py hold the cluster and rl sections' rules). Checks that divide by a value
come after the check that the value is positive.
"""

from __future__ import annotations

import re
from pathlib import Path

from vla_dist.checkpoint_layout import is_complete, latest_checkpoint
from vla_dist.config.cluster_checks import CLUSTER_CHECKS, RESERVED_RESOURCES
from vla_dist.config.rl_checks import RL_CHECKS
from vla_dist.config.rules import Check, at_least, greater_than, in_range, one_of, output_dir
from vla_dist.config.schema import RunConfig, TrainSection
from vla_dist.errors import ConfigError
from vla_dist.models.files import (
    FAMILIES,
    FAMILY_MODEL_TYPES,
    PretrainedError,
    check_model_source,
    check_pretrained_dir,
    check_state_inputs,
)
from vla_dist.spaces import ACTION_SPACES, CAMERAS, TASK_INSTRUCTIONS, TASK_NAMES

MIB = 1024 * 1024
SIM_BACKENDS = ("cpu", "gpu")
IMAGE_CODECS = ("mp4", "npz")
MODEL_DTYPES = ("float32", "bfloat16")
TOKEN_MODEL_TYPES = FAMILY_MODEL_TYPES["action_tokens"]


def _image_size_even(cfg: RunConfig) -> None:
    # Even sizes keep H.264 (yuv420p halves chroma resolution) and patch-based encoders happy.
    if cfg.task.image_size % 2:
        raise ConfigError("task.image_size", f"must be even, got {cfg.task.image_size}")


def _random_shift_fits_images(cfg: RunConfig) -> None:
    if cfg.data.random_shift * 4 > cfg.task.image_size:
        raise ConfigError("data.random_shift", f"must be at most a quarter of task.image_size "
                          f"({cfg.task.image_size // 4} px), got {cfg.data.random_shift}")


def _paraphrases(cfg: RunConfig) -> None:
    chosen = list(cfg.task.paraphrases)
    available = min(len(texts) for texts in TASK_INSTRUCTIONS.values())
    outside = [i for i in chosen if not 0 <= i < available]
    if outside:
        raise ConfigError("task.paraphrases", f"indices must be in 0..{available - 1} (every task has {available} "
                          f"phrasings, vla_dist/spaces.py), got {outside}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError("task.paraphrases", f"lists an index twice: {chosen}")


def _recipes(cfg: RunConfig) -> None:
    r = cfg.recipes
    if not r.seeds or len(set(r.seeds)) != len(r.seeds):
        raise ConfigError("recipes.seeds", f"must list at least one seed, each once, got {list(r.seeds)}")
    if not r.evals:
        raise ConfigError("recipes.evals", "must name at least one evaluation, e.g. {default: []}")
    for name in r.evals:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"recipes.evals.{name}", "eval names become directory names: letters, digits, - and _")
        bad = [o for o in r.evals[name] if "=" not in o or o.split("=", 1)[0].strip() in ("run.dir", "eval.checkpoint")]
        if bad:
            raise ConfigError(f"recipes.evals.{name}", f"takes KEY=VALUE overrides of the eval stage other than "
                              f"run.dir and eval.checkpoint (the plan sets those), got {bad}")
    if r.command == "rl" and not r.start_from:
        raise ConfigError("recipes.start_from", "an rl recipe continues another recipe's policy: name that recipe")


def _task_name(cfg: RunConfig) -> None:
    name = cfg.task.name
    parts = [part.strip() for part in name.split(",")]
    if name == "all" or (all(part in TASK_NAMES for part in parts) and len(set(parts)) == len(parts)):
        return
    raise ConfigError("task.name", f"must be all, one of {', '.join(TASK_NAMES)}, or several of them separated by "
                      f"commas (each once); got {name!r}")


def _cameras(cfg: RunConfig) -> None:
    cameras = list(cfg.task.cameras)
    allowed = ", ".join(CAMERAS)
    if not cameras:
        raise ConfigError("task.cameras", f"must name at least one camera of: {allowed}")
    unknown = [c for c in cameras if c not in CAMERAS]
    if unknown:
        raise ConfigError("task.cameras", f"unknown camera(s) {unknown}; allowed: {allowed}")
    if len(set(cameras)) != len(cameras):
        raise ConfigError("task.cameras", f"lists a camera twice: {cameras}")


def _appearance(cfg: RunConfig) -> None:
    for key, bound in (("sim.camera_offset", 0.3), ("sim.light_dir", None)):
        vector = list(getattr(cfg.sim, key.split(".")[1]))
        if len(vector) != 3:
            raise ConfigError(key, f"must be [x, y, z], got {vector}")
        if bound is not None and any(abs(v) > bound for v in vector):
            raise ConfigError(key, f"each component must be within +-{bound} m, got {vector}")
    if not any(cfg.sim.light_dir):
        raise ConfigError("sim.light_dir", "must not be [0, 0, 0]")


def _action_noise_space(cfg: RunConfig) -> None:
    # DART's noise perturbs the expert's end-effector translation where it executes (rollout/runner.py);
    # in a joint-position scene the expert's deltas become joint targets first, and noise on those is
    # another method, not built
    if cfg.collect.action_noise and cfg.sim.action_space != "ee_delta_pose":
        raise ConfigError("collect.action_noise", f"DART noise is defined on end-effector deltas; with "
                          f"sim.action_space={cfg.sim.action_space} set it to 0")


def _control_period_fits_dt(cfg: RunConfig) -> None:
    # One action is held for a whole number of physics steps; anything else drifts the control clock.
    period = 1.0 / cfg.task.control_hz
    steps = round(period / cfg.sim.dt)
    if steps < 1 or abs(period - steps * cfg.sim.dt) > 1e-9:
        raise ConfigError(
            "task.control_hz",
            f"1/{cfg.task.control_hz} = {period:g} s must be a whole multiple of sim.dt = {cfg.sim.dt:g} s",
        )


def _cluster_address(cfg: RunConfig) -> None:
    if cfg.cluster.address is not None and not cfg.cluster.address.strip():
        raise ConfigError("cluster.address", "must be null (in-process Ray), 'auto' or HOST:PORT; got ''")


def _model_pretrained(cfg: RunConfig) -> None:
    # load_config checks this too (with the weights); here for configs built in code.
    if cfg.model.pretrained is not None:
        try:
            check_model_source(cfg.model.pretrained)
        except PretrainedError as error:
            raise ConfigError("model.pretrained", str(error)) from None


def _model_hf_fits_family(cfg: RunConfig) -> None:
    # Catches e.g. model.family=action_tokens over the tiny-pi0 preset's PI0 architecture.
    model = cfg.model
    if model.pretrained is not None:
        return
    model_type = model.hf.get("model_type")
    if model.family == "action_tokens" and model_type not in TOKEN_MODEL_TYPES:
        raise ConfigError("model.hf", "the action_tokens family needs hf.model_type in "
                          f"{', '.join(TOKEN_MODEL_TYPES)}, "
                          f"got {model_type!r} (pick a preset of that family, e.g. model.preset=tiny-openvla)")
    if model.family == "pi0" and model_type is not None:
        raise ConfigError("model.hf", f"holds a {model_type!r} architecture, not PI0Config kwargs (pick a pi0 "
                          f"preset, e.g. model.preset=tiny-pi0)")


def _model_image_size_fits_patches(cfg: RunConfig) -> None:
    hf = cfg.model.hf
    vision = hf.get("vision_config") or (hf.get("vlm_config") or {}).get("vision_config") or {}
    patch = vision.get("patch_size")
    if isinstance(patch, int) and patch > 0 and cfg.model.image_size % patch:
        raise ConfigError("model.image_size", f"must be a multiple of the vision patch size {patch}, "
                          f"got {cfg.model.image_size}")


def _model_lora_targets(cfg: RunConfig) -> None:
    if cfg.model.lora_targets is not None:
        try:
            re.compile(cfg.model.lora_targets)
        except re.error as error:
            raise ConfigError("model.lora_targets",
                              f"not a valid regex ({error}): {cfg.model.lora_targets!r}") from None


def _model_state_inputs(cfg: RunConfig) -> None:
    """Checked against the dataset's state names when data.dir already has a manifest (a run that
    collects first is checked again when the policy is built); else the names alone."""
    if cfg.model.state_inputs is None:
        return
    known = None
    manifest = Path(cfg.data.dir) / "manifest.json"
    if manifest.is_file():
        import json

        try:
            known = json.loads(manifest.read_text(encoding="utf-8"))["state_space"]["names"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable manifest is reported by the command that reads the data
    check_state_inputs(cfg.model.state_inputs, known)


def _eval_offline_data(cfg: RunConfig) -> None:
    path = cfg.eval.offline_data
    if path is None:
        return
    if not (Path(path) / "manifest.json").is_file():
        raise ConfigError("eval.offline_data", f"{path} has no manifest.json: expected a dataset directory "
                          "(`vla-dist collect` writes one; shards + manifest.json)")
    if cfg.eval.policy != "model":
        raise ConfigError("eval.policy", f"{cfg.eval.policy!r} needs the simulator; offline evaluation "
                          "(eval.offline_data) scores a model policy")


def _eval_checkpoint(cfg: RunConfig) -> None:
    path = cfg.eval.checkpoint
    if path is None:
        return
    if (Path(path) / "vla_dist.json").is_file():
        try:  # a policy directory: whole, including an unmerged export's adapter/, before any actor starts
            check_pretrained_dir(path)
        except PretrainedError as error:
            raise ConfigError("eval.checkpoint", str(error)) from None
        return
    # A training run, its checkpoints/ or a step dir: eval exports its latest complete checkpoint.
    run_dir = Path(path).parent if Path(path).name == "checkpoints" else Path(path)
    if is_complete(path) or latest_checkpoint(run_dir) is not None:
        return
    raise ConfigError("eval.checkpoint", f"{path} is neither a saved policy directory (vla_dist.json) nor a training "
                      "run or checkpoint with a complete checkpoint; give an export, a run.dir of `vla-dist train`, "
                      "or null to evaluate the untrained model.preset")


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
    at_least("train.eval_every", 0),
    at_least("train.eval_episodes", 0),
    at_least("train.eval_actors", 1),
    greater_than("train.eval_cpus_per_actor", 0),
    _train_eval,
]


CHECKS: list[Check] = [
    # run
    at_least("run.seed", 0),
    output_dir("run.dir"),
    # task
    _task_name,
    in_range("task.image_size", 16, 512),
    _image_size_even,
    _paraphrases,
    _cameras,
    in_range("task.control_hz", 1, 100),
    at_least("task.max_steps", 0),
    # sim
    one_of("sim.backend", SIM_BACKENDS),
    one_of("sim.action_space", tuple(ACTION_SPACES)),
    greater_than("sim.dt", 0),
    in_range("sim.dt", 0, 0.05),
    at_least("sim.substeps", 1),
    _appearance,
    in_range("sim.light_intensity", 0, 20),
    in_range("sim.ambient_light", 0, 1),
    # collect
    at_least("collect.episodes", 1),
    at_least("collect.num_actors", 1),
    at_least("collect.envs_per_actor", 1),
    at_least("collect.max_attempts_factor", 1),
    at_least("collect.max_actor_restarts", 0),
    at_least("collect.num_videos", 0),
    in_range("collect.action_noise", 0, 0.05),
    in_range("collect.camera_jitter", 0, 0.1),
    in_range("collect.light_jitter", 0, 0.9),
    _action_noise_space,
    greater_than("collect.cpus_per_actor", 0),
    # data
    output_dir("data.dir"),
    one_of("data.image_codec", IMAGE_CODECS),
    at_least("data.shard_max_episodes", 1),
    at_least("data.shard_max_bytes", MIB),
    at_least("data.num_workers", 0),
    at_least("data.shuffle_buffer", 0),
    at_least("data.window_stride", 1),
    at_least("data.random_shift", 0),
    in_range("data.color_jitter", 0.0, 0.9),
    at_least("data.state_noise", 0.0),
    _random_shift_fits_images,
    # model
    one_of("model.family", FAMILIES),
    at_least("model.chunk_size", 1),
    at_least("model.num_inference_steps", 1),
    in_range("model.image_size", 8, 1024),
    at_least("model.max_text_tokens", 1),
    one_of("model.dtype", MODEL_DTYPES),
    at_least("eval.episodes", 1),
    one_of("eval.policy", ("model", "expert")),
    one_of("eval.seeds", ("heldout", "collection")),
    at_least("eval.action_horizon", 0),
    at_least("eval.temporal_ensemble", 0.0),
    at_least("eval.num_videos", 0),
    _eval_checkpoint,
    _eval_offline_data,
    _model_lora_targets,
    _model_state_inputs,
    _model_pretrained,
    _model_hf_fits_family,
    _model_image_size_fits_patches,
    # cluster
    at_least("cluster.num_cpus", 1, optional=True),
    output_dir("cluster.cache_dir", optional=True, expanduser=True),  # (shared_dir: a path on the cluster's nodes)
    _cluster_address,
    *CLUSTER_CHECKS,  # collect placement keys and cluster.slurm/kuberay/cloud (config/cluster_checks.py)
    # recipes
    one_of("recipes.command", ("train", "rl", "dagger")),
    # dagger
    at_least("dagger.rounds", 1),
    at_least("dagger.episodes_per_round", 1),
    at_least("dagger.train_steps", 1),
    # select
    one_of("select.score", ("loss", "disagreement", "random")),
    at_least("select.episodes", 1),
    at_least("select.samples", 2),
    _recipes,
    # bench
    at_least("bench.rollout_actors", 1),
    at_least("bench.rollout_steps", 1),
    *TRAIN_CHECKS,  # train (ranges, then batch consistency and offload rules)
    *RL_CHECKS,
    # cross-field rules (after the single-key ranges they divide by)
    _control_period_fits_dt,
]


def validate(cfg: RunConfig) -> RunConfig:
    """Run every check in order; raise ConfigError at the first failure. Returns `cfg` for chaining."""
    for check in CHECKS:
        check(cfg)
    return cfg
