"""Value rules the type system cannot express: ranges, choices, cross-field constraints.

`CHECKS` is a flat list of small checks run in order; each raises ConfigError naming the full key,
the bad value and what is allowed. A new section adds its rules by appending to the list (built
from the helpers in rules.py, or a plain function taking the RunConfig; cluster_checks.py and
rl_checks.py, model_checks.py and train_checks.py hold those sections' rules). Checks that divide by a value
come after the check that the value is positive.
"""

from __future__ import annotations

from vla_dist.config.cluster_checks import CLUSTER_CHECKS
from vla_dist.config.model_checks import MODEL_CHECKS
from vla_dist.config.rl_checks import RL_CHECKS
from vla_dist.config.rules import Check, at_least, greater_than, in_range, one_of, output_dir
from vla_dist.config.schema import RunConfig
from vla_dist.config.train_checks import TRAIN_CHECKS
from vla_dist.errors import ConfigError
from vla_dist.spaces import ACTION_SPACES, CAMERAS, CORE_TASKS, TASK_INSTRUCTIONS, TASK_NAMES

MIB = 1024 * 1024
SIM_BACKENDS = ("cpu", "gpu")
IMAGE_CODECS = ("mp4", "npz")


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
    raise ConfigError("task.name", f"must be all (the red cube's tasks: {', '.join(CORE_TASKS)}), "
                      f"one of {', '.join(TASK_NAMES)}, or several of them separated by "
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


def _own_labels_need_a_policy(cfg: RunConfig) -> None:
    # the expert's demonstrations are its own actions already; "own" names a policy's rollouts
    if cfg.collect.labels == "own" and cfg.collect.relabel_policy is None:
        raise ConfigError("collect.labels", "'own' records a saved policy's own actions: set "
                          "collect.relabel_policy to that policy (null collects the expert's demonstrations)")


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
    one_of("collect.labels", ("expert", "own")),
    _own_labels_need_a_policy,
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
    *MODEL_CHECKS,  # model and eval (config/model_checks.py)
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
    one_of("dagger.labels", ("expert", "own")),
    # select
    one_of("select.score", ("loss", "disagreement", "random")),
    at_least("select.episodes", 1),
    at_least("select.samples", 2),
    _recipes,
    # bench
    at_least("bench.rollout_actors", 1),
    at_least("bench.rollout_steps", 1),
    *TRAIN_CHECKS,  # train (config/train_checks.py: ranges, then batch consistency and offload rules)
    *RL_CHECKS,
    # cross-field rules (after the single-key ranges they divide by)
    _control_period_fits_dt,
]


def validate(cfg: RunConfig) -> RunConfig:
    """Run every check in order; raise ConfigError at the first failure. Returns `cfg` for chaining."""
    for check in CHECKS:
        check(cfg)
    return cfg
