"""The typed run configuration: one dataclass per component, composed into `RunConfig`.

OmegaConf builds a structured config from these classes, so an unknown key or a wrong type is
rejected by OmegaConf itself with the full key path; value ranges and cross-field rules are checked
in `vla_dist.config.validate`. Keys named in `shared/design.md` are a contract: renaming one is a
breaking change (tests/test_config.py freezes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vla_dist.config.cluster_schema import CloudSection, ClusterSection, KubeRaySection, SlurmSection
from vla_dist.spaces import CAMERAS

__all__ = ["CloudSection", "ClusterSection", "KubeRaySection", "SlurmSection"]  # and the sections below


@dataclass
class RunSection:
    dir: str = "runs/quickstart"  # outputs: config.yaml, report.json, videos/, metrics.jsonl, checkpoints/
    seed: int = 0  # base seed; episode i of a collection uses a seed derived from (seed, i)


@dataclass
class TaskSection:
    # one of vla_dist.spaces.TASK_NAMES, several separated by commas (push_cube,stack_cube), or "all":
    # episodes are spread round-robin over them
    name: str = "all"
    image_size: int = 64  # square RGB images for every camera, pixels
    cameras: list[str] = field(default_factory=lambda: list(CAMERAS))
    control_hz: int = 10  # policy/action rate; physics runs at 1/sim.dt
    max_steps: int = 0  # episode step limit at control_hz; 0: the task's own default
    # indices into each task's instruction paraphrases (vla_dist/spaces.py) that episodes draw from;
    # []: all. Collect on [0, 1, 2] and evaluate on [3]: success on a phrasing never trained on
    paraphrases: list[int] = field(default_factory=list)


@dataclass
class SimSection:
    backend: str = "cpu"  # "cpu" or "gpu" (Genesis backend)
    dt: float = 0.01  # physics step, seconds
    substeps: int = 2
    # What the arm is commanded in (vla_dist/spaces.py): "ee_delta_pose" (hand target deltas through the
    # scene's inverse kinematics), "joint_position" (the seven joint targets) or "joint_delta" (those
    # targets as offsets from the measured joints). Collection records it
    # in the manifest; a policy runs only in a scene of its own action space (the embodiment recipes)
    action_space: str = "ee_delta_pose"
    # What the cameras see, none of which changes physics or success (vla_dist/sim/appearance.py): the
    # defaults are the scene every dataset and policy so far was made in; the perception recipes'
    # perturbed evaluation changes them (docs/recipes.md)
    camera_offset: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # m, front camera (look-at kept)
    light_dir: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0])  # directional light
    light_intensity: float = 5.0
    ambient_light: float = 0.3  # grey level, 0..1
    distractor: bool = False  # a yellow cube on the table, per episode away from the task's objects
    # Both cubes on the table in every episode: the one a pick or push does not use stands at a free
    # spot (a real body), so only the instruction tells pick_cube from pick_blue_cube (held-out task
    # combinations, docs/recipes.md)
    both_cubes: bool = False


@dataclass
class CollectSection:
    episodes: int = 12  # successful episodes to write (exact)
    num_actors: int = 2  # Ray sim actors, one Genesis scene each
    envs_per_actor: int = 2  # parallel envs (n_envs) in each actor's scene; also the work-chunk size
    keep_failures: bool = False  # also write failed expert episodes, marked success=false
    max_attempts_factor: float = 3.0  # give up after episodes * factor attempts (expert broken?)
    max_actor_restarts: int = 3  # Ray restarts of a dead sim actor before collection fails
    # DART: std (m per control step) of Gaussian noise on the hand translation the expert's actions
    # execute; the recorded actions stay the expert's, so the data shows recoveries (rollout/runner.py)
    action_noise: float = 0.0
    # camera randomization: each episode's front camera stands at a uniform offset in +-this (m) per axis
    # from sim.camera_offset, so the policy cannot rely on one viewpoint (perception recipes); 0: fixed
    camera_jitter: float = 0.0
    # lighting randomization, per batch of envs: light intensity and ambient level scaled by U[1-j, 1+j],
    # the light turned about the vertical by up to j x 180 degrees (vla_dist/sim/appearance.py); 0: fixed
    light_jitter: float = 0.0
    # a saved policy (an export) drives the arm for collect.episodes rollouts (vla_dist/rollout/collect.py);
    # null: the scripted expert collects demonstrations
    relabel_policy: str | None = None
    # with relabel_policy, what its episodes record: "expert" (DAgger: the scripted expert's label of every
    # state the policy reaches, every rollout written) or "own" (self-imitation: the policy's own executed
    # actions, its successful rollouts only)
    labels: str = "expert"
    num_videos: int = 3  # episodes written as mp4 under run.dir/videos/
    cpus_per_actor: float = 1.0  # Ray resources a sim actor reserves
    overwrite: bool = False  # allow collecting into a data.dir that already holds shards
    # Placement on a heterogeneous cluster: custom Ray resources each sim actor needs, e.g. {sim: 1}
    # so actors land only on nodes started with --resources='{"sim": N}' (cluster/ does that on CPU
    # sim nodes); {} (default) places them on any node with free CPUs, the in-process Ray included.
    actor_resources: dict[str, float] = field(default_factory=dict)
    memory_per_actor_gb: float = 0.0  # Ray memory reserved per sim actor (0: none; ~1.5 per Genesis scene)


@dataclass
class DataSection:
    dir: str = "data/quickstart"  # shards (*.tar) and manifest.json
    image_codec: str = "mp4"  # "mp4" (H.264, small) or "npz" (lossless, zlib)
    shard_max_episodes: int = 64
    shard_max_bytes: int = 256 * 1024 * 1024
    # training windows (vla_dist/data/loader.py: WindowLoader.from_config)
    num_workers: int = 2  # DataLoader worker processes per trainer rank (0: read in the trainer process)
    shuffle_buffer: int = 256  # windows shuffled together (>= this many, whole episodes); 0: no shuffle
    window_stride: int = 1  # a window every this many steps of an episode
    # training images move by up to this many pixels, edges repeated (vla_dist/data/augment.py); 0: off
    random_shift: int = 0
    color_jitter: float = 0.0  # brightness, contrast, saturation each scaled by a factor in [1 - j, 1 + j]; 0: off
    state_noise: float = 0.0  # std of Gaussian noise on the training state (raw units: m, rad); 0: off


@dataclass
class BenchSection:
    rollout_actors: int = 2  # N in the N-actor vs 1-actor scaling measurement
    rollout_steps: int = 30  # control steps measured per configuration (after warm-up)


@dataclass
class ModelSection:
    # configs/model/<preset>.yaml is the base of this section; files and overrides win over it.
    # Defaults below are tiny-pi0's, so a bare RunConfig() is consistent with the default preset.
    preset: str = "tiny-pi0"
    # null: random init from the preset; else a local directory saved by vla-dist (save_pretrained):
    # its architecture (family, chunk_size, image_size, max_text_tokens, hf) replaces the preset's;
    # or a plain transformers PI0 checkpoint (config.json + safetensors + tokenizer.json): its
    # architecture (chunk_size, image_size) too, with the dataset's dims and statistics (README)
    pretrained: str | None = None
    # a model.pretrained policy saved by vla-dist acting in another action space than the dataset's
    # (end-effector deltas -> joint targets): keep its weights and learn the dataset's actions from them
    # (embodiment re-targeting, docs/recipes.md); false: such a policy is refused
    retarget: bool = False
    family: str = "pi0"  # "pi0" (flow matching) or "action_tokens" (OpenVLA-style 256-bin tokens)
    chunk_size: int = 8  # actions predicted per call (t .. t+chunk_size-1)
    num_inference_steps: int = 10  # pi0: Euler steps of flow-matching sampling
    image_size: int = 32  # model input resolution (square); shard images are resized to it
    max_text_tokens: int = 24  # instruction prompt length in tokens (cut, then padded)
    dtype: str = "float32"  # "float32" or "bfloat16"
    compile: bool = False  # torch.compile the action decoding (vla_dist.kernels)
    lora_targets: str | None = None  # peft target_modules regex; null: the family's default (LM only)
    # Proprioceptive inputs the policy reads, by name from the dataset's state_space (e.g. [gripper_width]);
    # null: every dim. The others are zeroed after normalization. Leaving out where the hand is forces the
    # policy to see where the cube is: with the hand pose in its input, an imitation learns to keep
    # going where the hand is already heading (the copycat shortcut) and ignores the images at t=0.
    state_inputs: list[str] | None = None
    hf: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs of the architecture


@dataclass
class EvalSection:
    episodes: int = 4  # closed-loop episodes per task (seeds disjoint from collection's)
    policy: str = "model"  # "model": a VLA (eval.checkpoint or the untrained model.preset); "expert": scripted
    checkpoint: str | None = None  # a saved/exported policy directory; null: untrained model.preset (smoke run)
    action_horizon: int = 0  # actions executed per predicted chunk before re-planning; 0: the whole chunk
    # > 0: temporal ensembling (ACT, Zhao et al. 2023): predict a chunk every step and execute the
    # average of every prediction made for this step, weighted exp(-k * age rank), oldest first; 0: off
    temporal_ensemble: float = 0.0
    # pi0: > 0 scores the Flow-SDE sampler RL explores with (vla_dist/rl/flow_sde.py: noise of this scale
    # at one denoising step drawn per decision, as rl.random_sde_step) instead of the ODE sampler: what a
    # policy's RL rollouts succeed at, on the held-out layouts; 0: the ODE sampler (the deployed policy)
    noise_level: float = 0.0
    num_videos: int = 4  # episodes written as mp4 under run.dir/videos/ (successes and failures alternate)
    # "heldout": layouts never collected (a seed stream disjoint from collection's); "collection": the
    # layouts `vla-dist collect` draws under the same run.seed and task.name (episode i = collected
    # episode i): scores a policy on its own training layouts, e.g. to check it can replay what it learned
    # "rl": the pool of rl.layouts layouts an RL run with the same run.seed practised (episode i = layout
    # i mod rl.layouts)
    seeds: str = "heldout"
    # A dataset directory (shards + manifest.json) of held-out episodes: score the policy without a
    # simulator (data from a real robot) by the error of its predicted chunks against the recorded
    # actions (vla_dist/offline_eval.py: MSE overall, per action dim, per chunk step, per task, and the
    # mean-action baseline). null: closed-loop episodes in simulation.
    offline_data: str | None = None


@dataclass
class LoraSection:
    enabled: bool = False  # train a peft LoRA adapter on model.lora_targets (else every parameter)
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling = alpha / r
    dropout: float = 0.0


@dataclass
class TrainSection:
    """`vla-dist train`: supervised post-training with DeepSpeed ZeRO on a Ray trainer group."""

    steps: int = 20  # optimizer steps (total, counting those before a resume)
    world_size: int = 2  # trainer ranks (Ray actors), one per GPU (or CPU process)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0..3
    lora: LoraSection = field(default_factory=LoraSection)
    save_every: int = 10  # checkpoint every N optimizer steps (and at the end); 0: only at the end
    resume: str = "auto"  # "auto": the latest complete checkpoint of run.dir if any; "never"; or a step_N dir
    micro_batch_size: int = 4  # windows per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch_size: int = 0  # 0: micro_batch_size * grad_accum * world_size; else must equal it
    lr: float = 1.0e-3
    warmup_steps: int = 2  # linear warm-up, then cosine decay to 1% of lr at `steps`
    weight_decay: float = 0.0
    # torch's fused AdamW kernel: the optimizer step 5.5x faster on CPU (docs/benchmarks.md), results equal
    # up to float rounding, which over hundreds of steps moves a run elsewhere (a closed-loop memorization
    # test changed outcome): off by default so runs reproduce earlier ones
    fused_optimizer: bool = False
    grad_clip: float = 1.0  # global grad-norm clipping; 0: off
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stage >= 1)
    offload_params: bool = False  # parameters to CPU (stage 3 only)
    keep_last: int = 3  # complete checkpoints kept (older ones deleted after a newer one is complete)
    max_nan_steps: int = 3  # stop after this many non-finite losses in a row (last good checkpoint kept)
    # Driver progress/console update period in steps (metrics.jsonl has every step either way); 0: about
    # every PROGRESS_S seconds. Each update is a Ray round trip that idles every rank (tiny-pi0 on 2 cores:
    # 5 ms a step at log_every=1, 14% of the step; 0.3 ms at 25).
    log_every: int = 0
    gpus_per_rank: float = 0.0  # 0: CPU ranks (gloo, fp32); >0: CUDA ranks (NCCL, bf16)
    cpus_per_rank: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    # Placement on a heterogeneous cluster: custom Ray resources each rank needs, e.g. {trainer: 1} so
    # ranks land only on nodes started with --resources='{"trainer": N}'; {} (default): any node.
    rank_resources: dict[str, float] = field(default_factory=dict)
    memory_gb_per_rank: float = 0.0  # Ray memory reserved per rank (0: none)
    # debug/overfit check: every step draws the same windows, noise and flow-matching times, so the
    # loss is comparable step to step (it must fall steadily); false for real training
    fixed_batches: bool = False
    # Auxiliary perception target (models/object_head.py): a head on the policy's image tokens predicts
    # the red cube's position (recorded at collection, Episode.object_pos) and this weight x its error
    # (in units of 10 cm) joins the action loss; the head is for training only, never saved. 0: off
    object_target: float = 0.0
    # Per-step time breakdown in metrics.jsonl (`breakdown_ms`: data, forward, NaN check, backward split
    # into compute and gradient reduction by DeepSpeed's wall_clock_breakdown timers, optimizer step;
    # train/breakdown.py). Synchronizes the GPU at each phase: for finding where time goes, not for speed.
    breakdown: bool = False
    # Training-time evaluation (train/evals.py): every eval_every steps (and at the last step) the ranks
    # write the current weights as a policy directory and go on training while a pool of eval_actors
    # sim actors runs it closed-loop (eval.* settings: action_horizon, num_videos; task.max_steps);
    # success rows go to metrics.jsonl. The eval actors' CPUs come on top of the ranks': on the
    # in-process Ray, world_size * cpus_per_rank + eval_actors * eval_cpus_per_actor must fit.
    eval_every: int = 0  # steps; 0: off
    eval_episodes: int = 0  # closed-loop episodes per task per eval; 0: eval.episodes
    eval_actors: int = 1  # sim actors of the training-time eval pool (envs each: collect.envs_per_actor)
    eval_cpus_per_actor: float = 1.0  # Ray CPUs each reserves; < 1 lets them share cores with the ranks
    keep_best: bool = False  # also checkpoint at eval steps; checkpoints/best -> the best-scoring one, never pruned
    tensorboard: bool = False  # every metric (and a few eval videos as GIFs) to run.dir/tensorboard
    wandb: bool = False  # the same to Weights & Biases (pip install vla-dist[wandb]); offline without WANDB_API_KEY
    wandb_project: str = "vla-dist"


@dataclass
class RLSection:
    """`vla-dist rl`: PPO/GRPO from policy rollouts on the sim-actor pool (vla_dist/rl/). The trainer
    ranks are `train.*` (world_size, zero_stage, lora, cpus/gpus per rank); the rollout pool is
    `collect.*` (num_actors, envs_per_actor, placement). The start is `model.pretrained`."""

    iterations: int = 2  # rollout -> update -> weight sync rounds (total, counting those before a resume)
    algorithm: str = "ppo"  # "ppo" (clipped ratio, GAE, value head on the policy's features) or "grpo"
    episodes_per_iteration: int = 8  # rollouts per iteration (GRPO: groups of group_size on one seed)
    # > 0: the rollouts practise a fixed pool of this many layouts, cycled in order across iterations
    # (layout j: the first iteration's fresh layout j, with task j mod tasks); `vla-dist eval` with eval.seeds=rl scores
    # a policy on the same pool: does RL learn what it practises (before asking it to generalize)?
    # 0: every rollout group a fresh layout
    layouts: int = 0
    group_size: int = 4  # GRPO: rollouts of the same layout whose returns are compared
    horizon: int = 0  # control steps each sampled chunk is executed for (one PPO decision); 0: the whole chunk
    noise_level: float = 0.5  # pi0 Flow-SDE: exploration noise scale of the stochastic denoising step
    sde_step: int = 0  # pi0: which Euler step (1..model.num_inference_steps-1) is stochastic; 0: the middle one
    random_sde_step: bool = False  # pi0: each decision draws its stochastic step uniformly (1..N-1) instead
    # pi0: every denoising step 1..N-1 stochastic (Flow-GRPO's sampler) instead of one: the log-probability then
    # sees most of the exploration (one step leaves the initial noise, most of an action's spread, outside it),
    # at N-1 model forwards per decision in the update
    sde_every_step: bool = False
    temperature: float = 1.0  # action tokens: sampling temperature
    # > 0: rollouts execute as evaluation with eval.temporal_ensemble does, each step the ACT average
    # (weights exp(-k i)) of the overlapping sampled chunks; 0: each chunk's first rl.horizon actions as they are
    temporal_ensemble: float = 0.0
    lr: float = 1.0e-5  # constant, AdamW (train.weight_decay, train.grad_clip apply)
    epochs: int = 2  # passes over each iteration's decisions
    minibatch_size: int = 8  # decisions per rank per optimizer step
    clip: float = 0.2  # PPO ratio clip
    # "decision": the policy loss is a mean over decisions (a failed rollout, longer, outweighs a success);
    # "episode": each decision weighted by 1 / its episode's decisions (times their mean), every episode once
    loss_weighting: str = "decision"
    # stop an iteration's update early once a minibatch's approx KL to the sampling policy (mean over ranks)
    # passes 1.5x this (Stable-Baselines3's rule); 0: off. Large first steps are what undid a 75% policy
    target_kl: float = 0.0
    # > 0: add kl_coef * KL(policy || start policy) on each iteration's decisions to the loss (GRPO's
    # reference penalty; the k2 estimator 0.5 (log pi - log pi_ref)^2 on the sampled paths, weighted as the
    # policy loss is). It holds the states the advantages leave alone, e.g. a layout every rollout of its
    # GRPO group solved (advantage 0). Costs a frozen copy of the start policy per rank and one more forward
    kl_coef: float = 0.0
    # PPO: the first N iterations train the value head only, so no policy step follows a random critic's
    # advantages (with rl.value_trains_backbone the value loss still moves the shared backbone)
    critic_warmup: int = 0
    value_coef: float = 0.5  # PPO: weight of the value loss
    # PPO: the value head's learning rate (its own optimizer group); 0: rl.lr. At a policy's lr (1e-5..1e-4)
    # a head whose output starts at zero barely leaves it in a few hundred steps: advantages stay the returns
    value_lr: float = 0.0
    value_trains_backbone: bool = False  # PPO: the value loss also trains the shared backbone (else the head only)
    # PPO: passes of value-only minibatch steps over each iteration's decisions, before the policy's update,
    # on the inputs the head read when the decisions were evaluated (no backbone pass). The policy's steps
    # (and a KL target ending them) leave the head a few dozen steps per iteration: too few to fit returns
    value_epochs: int = 0
    # PPO: what the value head reads. "features": the policy's pooled prompt features; "state": every dim of
    # the robot's state (joints, finger opening, hand pose), standardized, whatever model.state_inputs the
    # policy reads (an asymmetric critic: the head is dropped at export). A head without "features" costs
    # no backbone pass
    value_inputs: list[str] = field(default_factory=lambda: ["features"])
    gamma: float = 0.99  # per decision
    gae_lambda: float = 0.95
    shaped_reward: float = 0.0  # > 0: add this times the decrease of the grasp point's distance to the cube (m)
    save_every: int = 1  # iterations; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "never" | a checkpoint dir (rl runs' own checkpoints)
    eval_every: int = 0  # iterations; held-out greedy eval at iteration 0, every N, and the last; 0: off
    eval_episodes: int = 0  # per task per eval; 0: eval.episodes
    sync_timeout_s: float = 300.0  # a weight sync not acknowledged by every sim actor within this fails


@dataclass
class DaggerSection:
    """`vla-dist dagger` (vla_dist/dagger.py): rounds of the policy's own rollouts labelled by the
    scripted expert, aggregated with data.dir's demonstrations, and training continued on them."""

    rounds: int = 3
    episodes_per_round: int = 32  # rollouts of the current policy per round (expert labels: each labelled and kept)
    train_steps: int = 500  # optimizer steps per round on the aggregate (train.* as for `vla-dist train`)
    # what a round's rollouts add to the aggregate (collect.labels): "expert" (DAgger: the expert's labels of
    # every rollout's states) or "own" (self-imitation, no expert: the policy's own actions in its successes)
    labels: str = "expert"


@dataclass
class SelectSection:
    """`vla-dist select` (vla_dist/select.py): active data selection. Which episodes of a pool to train
    on, chosen by what the policy eval.checkpoint makes of them; data.dir receives the choice (after
    the datasets in `keep`)."""

    pool: str | None = None  # the candidate episodes: a dataset directory
    # "loss": the policy's training loss on each episode (what it has not learned yet); "disagreement":
    # the spread of its sampled action chunks (pi0; needs no recorded actions); "random": the control
    score: str = "loss"
    episodes: int = 64  # how many to choose
    samples: int = 4  # disagreement: chunks sampled per window
    exclude: list[str] = field(default_factory=list)  # datasets whose episodes are never chosen (e.g. the policy's own)
    keep: list[str] = field(default_factory=list)  # datasets data.dir holds ahead of the choice (e.g. that same set)


@dataclass
class RecipesSection:
    """`vla-dist recipes run/report` (vla_dist/recipes/): post-training recipes compared with a baseline
    on the same seeds, data budget and held-out layouts. dir, seeds, baseline and evals are the
    comparison's (read from the baseline recipe's file and the command line); command, start_from and
    control are each recipe's own."""

    dir: str = "runs/recipes"  # one directory per recipe and seed, and recipes.{md,json,png}
    seeds: list[int] = field(default_factory=lambda: [0])  # run.seed of each repetition (init, data order, layouts)
    # configs/recipe/<name>.yaml that every other recipe is compared with; a recipe's file names its own
    # (the recipes of one comparison name the same one); the command line's wins
    baseline: str = "base-pick"
    command: str = "train"  # how the recipe post-trains: "train" (SFT on its data), "rl" or "dagger" (those commands)
    start_from: str | None = None  # a recipe whose policy (same seed) this one continues; null: model.pretrained
    # a recipe this one is also compared with, layout by layout: the same budget without what this one
    # adds (re-targeting's and transfer's: the same few demonstrations from scratch); the report's
    # "vs control" column. null: the baseline only
    control: str | None = None
    # held-out evaluations of every recipe: name -> overrides of the eval stage only, e.g.
    # {default: [], new_phrasing: ["task.paraphrases=[3]"]}
    evals: dict[str, list[str]] = field(default_factory=lambda: {"default": []})


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    sim: SimSection = field(default_factory=SimSection)
    collect: CollectSection = field(default_factory=CollectSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)
    rl: RLSection = field(default_factory=RLSection)
    dagger: DaggerSection = field(default_factory=DaggerSection)
    select: SelectSection = field(default_factory=SelectSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    bench: BenchSection = field(default_factory=BenchSection)
    recipes: RecipesSection = field(default_factory=RecipesSection)
