"""The `vla-dist` command line: its commands, their help texts and arguments (`build_parser`).

What each command does is in vla_dist/cli.py (dispatch) and the modules it calls; this file only
describes them, and imports nothing heavy, so `--help` answers instantly.
"""

from __future__ import annotations

import argparse

from vla_dist import __version__
from vla_dist.data.cli import add_commands as add_data_commands  # no Ray/torch at import

# `vla-dist bench NAME` -> the module and function that run it (imported only when chosen: they
# pull in Ray and torch); each returns its report, printed as one JSON line, the last of stdout.
BENCHES: dict[str, str] = {
    "data": "vla_dist.bench.data:run_data_bench",
    "decode": "vla_dist.bench.decode:run_decode_bench",
    "rollout": "vla_dist.bench.rollout:run_rollout_bench",
    "codec": "vla_dist.bench.codec:run_codec_bench",
    "train": "vla_dist.bench.train:run_train_bench",
    "checkpoint": "vla_dist.bench.checkpoint:run_checkpoint_bench",
    "rl": "vla_dist.bench.rl:run_rl_bench",
    "load": "vla_dist.bench.load:run_load_bench",
}


EXAMPLES = """examples:
  vla-dist quickstart                                # collect -> train (full, LoRA) -> eval, on this machine
  vla-dist collect                                   # configs/quickstart.yaml
  vla-dist collect task.name=pick_cube collect.episodes=4
  vla-dist eval eval.policy=expert                   # success rate of the scripted expert
  vla-dist eval eval.checkpoint=runs/x/export        # success rate of a saved/exported policy
  vla-dist eval eval.checkpoint=runs/x               # ... of a training run's latest checkpoint
  vla-dist replay data.dir=data/quickstart           # replay the dataset's actions: does it reproduce?
  vla-dist config --config configs/quickstart.yaml   # print the resolved config
  vla-dist bench rollout bench.rollout_actors=4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-dist",
        description="Distributed post-training of Vision-Language-Action robot policies: "
        "Genesis simulation on Ray, WebDataset shards, DeepSpeed training.",
        epilog=EXAMPLES + "\nexit codes: 0 ok, 2 bad config or usage, 1 runtime failure, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vla-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="on a runtime failure, show the full traceback")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="the whole loop on this machine: collect, train (full and LoRA), eval before/after",
        description="Run, as separate stages under run.dir, what a user would type one by one: collect "
        "(reusing a data.dir that already holds collect.episodes episodes), eval of the scripted expert and "
        "of the untrained model.preset, train with train.lora.enabled=false then true, and eval of both "
        "trained policies. Prints each stage's equivalent command; writes run.dir/summary.{json,md,png} "
        "comparing success rates and how close each policy's gripper came to the cube. A finished stage "
        "(its report.json exists) is kept on a re-run, so an interrupted quickstart continues.",
    )
    _add_config_arguments(quickstart)

    collect = commands.add_parser(
        "collect",
        help="scripted Genesis demonstrations into WebDataset shards",
        description="Run the scripted expert in Genesis on a pool of Ray sim actors and write exactly "
        "collect.episodes successful episodes as WebDataset shards (*.tar + manifest.json) to data.dir. "
        "The resolved config goes to run.dir/config.yaml, sample videos to run.dir/videos/.",
    )
    _add_config_arguments(collect)

    evaluate = commands.add_parser(
        "eval",
        help="closed-loop success rate of a policy in simulation",
        description="Run eval.episodes episodes per task on the Ray sim-actor pool with eval.policy: "
        "'model' (eval.checkpoint: a saved or exported policy directory, or a `vla-dist train` run.dir whose "
        "latest checkpoint is exported to run.dir/policy first; null: the untrained model.preset "
        "as a smoke run, normalized with data.dir's manifest) or 'expert' (the scripted expert). Writes "
        "run.dir/report.json (success rate per task with 95% intervals, episode length, decode latency) "
        "and videos of successes and failures under run.dir/videos/. With eval.offline_data=DIR (held-out "
        "episodes, e.g. from a real robot) no simulator runs: report.json holds the error of the policy's "
        "predicted chunks against the recorded actions (MSE per action dim, per chunk step, per task) and "
        "that of always predicting the mean action.",
    )
    _add_config_arguments(evaluate)

    replay = commands.add_parser(
        "replay",
        help="data fidelity: replay a dataset's recorded actions open loop in fresh scenes",
        description="Rebuild every episode of data.dir (task.name: one task, several, or all) from its task and "
        "seed and play its recorded actions back open loop on the Ray sim-actor pool (collect.num_actors x "
        "collect.envs_per_actor, no rendering). Writes run.dir/report.json: per task the share of recorded "
        "successes the replay reproduces, and per episode the state drift (max |proprio replayed - recorded|). "
        "sim.* and task.control_hz must be the collection's (checked against the manifest).",
    )
    _add_config_arguments(replay)

    train = commands.add_parser(
        "train",
        help="supervised post-training (full or LoRA) with DeepSpeed ZeRO",
        description="Train the model.preset policy on data.dir's shards with train.world_size DeepSpeed ranks "
        "placed by Ray (ZeRO stage train.zero_stage, LoRA with train.lora.enabled). Writes run.dir/metrics.jsonl "
        "(one line per optimizer step), loss.png, report.json and checkpoints/step_N (latest complete one "
        "pointed to by checkpoints/latest; train.resume=auto continues from it). train.eval_every=N evaluates "
        "the current weights closed-loop every N steps while training goes on (success rows in metrics.jsonl, "
        "train.keep_best keeps checkpoints/best); train.tensorboard / train.wandb log every metric.",
    )
    _add_config_arguments(train)

    rl = commands.add_parser(
        "rl",
        help="RL post-training (PPO or GRPO) from simulated rollouts, starting from model.pretrained",
        description="Start from the policy at model.pretrained; each of rl.iterations iterations the sim-actor pool "
        "(collect.num_actors x collect.envs_per_actor) runs rl.episodes_per_iteration rollouts of the current weights "
        "with exploration (pi0: Flow-SDE; action tokens: sampled tokens), the train.world_size DeepSpeed ranks "
        "(train.zero_stage, train.lora.enabled) update the policy with rl.algorithm (ppo: clipped ratio, GAE, value "
        "head; grpo: group-relative advantages), and the new weights are synced to every actor, versioned. Writes "
        "run.dir/metrics.jsonl (a row per iteration; held-out eval rows every rl.eval_every), success.png, "
        "report.json and checkpoints/step_N (with policy/: eval.checkpoint reads it). Re-running with a larger "
        "rl.iterations continues from the last complete checkpoint.",
    )
    _add_config_arguments(rl)

    dagger = commands.add_parser(
        "dagger",
        help="expert-in-the-loop post-training (DAgger) from model.pretrained",
        description="Start from the policy at model.pretrained (trained on data.dir's demonstrations); each of "
        "dagger.rounds rounds the sim-actor pool runs dagger.episodes_per_round episodes of the current policy (as "
        "`vla-dist eval` runs it, on layouts of their own), the scripted expert labels every state they reach, the "
        "labels join the demonstrations, and the policy trains on the aggregate for dagger.train_steps steps "
        "(train.*: ranks, ZeRO, LoRA). Writes run.dir/round_R/{labels,data,train,policy}, report.json and "
        "dagger.png (each round's rollout success, 95% intervals); run.dir/policy is the last round's policy. "
        "Re-running continues from the last finished round.",
    )
    _add_config_arguments(dagger)

    select = commands.add_parser(
        "select",
        help="active data selection: the episodes of a pool a policy should train on next",
        description="Score every episode of select.pool that is in no select.exclude dataset by what the policy "
        "eval.checkpoint makes of it (select.score: loss, its training loss on the episode; disagreement, the "
        "spread of its sampled action chunks, pi0 only; random, the control), choose the select.episodes highest, "
        "and write them to run.dir/selected (bytes copied) and data.dir (the select.keep datasets, then the "
        "choice) for `vla-dist train`. Writes run.dir/report.json (every candidate's score) and scores.png.",
    )
    _add_config_arguments(select)

    export = commands.add_parser(
        "export",
        help="checkpoint -> HF-format policy directory, peft adapter, or merged model",
        description="Write a saved policy directory (transformers save_pretrained, safetensors) from a training "
        "checkpoint; for LoRA runs the base policy plus adapter/, or with --merge-lora the merged weights. "
        "The result loads with vla_dist.models.load_policy and serves eval.checkpoint.",
    )
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoints/step_N, run.dir or run.dir/checkpoints")
    export.add_argument("--out", required=True, metavar="DIR", help="output directory")
    export.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights")
    _add_config_arguments(export)

    bench = commands.add_parser(
        "bench",
        help="a benchmark; prints one JSON line (name, value, unit, baseline, ratio, device)",
        description="Measure one speed claim against a baseline measured in the same run. "
        "data: training-window pipeline (decode, split, shuffle, collate) vs a plain sequential read; "
        "decode: compiled vs eager action decoding per model family, batch 1 and a large batch; "
        "rollout: N sim actors vs 1 (bench.rollout_actors, bench.rollout_steps); "
        "codec: episode image encoding, speed and size per codec; "
        "train: samples/s of train.world_size DeepSpeed ZeRO ranks vs one plain PyTorch AdamW process, same model "
        "and global batch (train.steps timed steps; MFU on GPU); "
        "checkpoint: DeepSpeed save GB/s vs a plain fsync'd torch.save of the same bytes on the same disk (run.dir); "
        "rl: env-steps/s of policy rollouts with exploration vs the expert on the same sim actors, and weight-sync "
        "GB/s vs a plain ray.put/ray.get of the same bytes; "
        "load: peak host MiB per rank loading model.pretrained partitioned under ZeRO-3 vs whole (ZeRO-2). "
        "The last line of stdout is one JSON object.",
    )
    bench.add_argument("name", metavar="NAME", choices=list(BENCHES), help=f"one of: {', '.join(BENCHES)}")
    _add_config_arguments(bench)

    recipes = commands.add_parser(
        "recipes",
        help="post-training recipes against a baseline: same seeds, budget and held-out layouts",
        description="run NAME...: for every seed in recipes.seeds, collect (once per recipe; a data.dir that "
        "already holds the episodes is reused), train or rl, and evaluate every recipes.evals variant, each "
        "recipe from configs/recipe/NAME.yaml (or a .yaml path) and the baseline first (recipes.baseline: the "
        "command line's, else the one the recipes' files name; its file gives recipes.dir), as "
        "separate stages under recipes.dir/NAME/seed_S/; a finished stage is kept on a re-run. Every config "
        "and the budgets (each SFT recipe trains the baseline's samples) are checked before anything runs. "
        "Then, like report, writes recipes.dir/recipes.{md,json,png}: success per recipe, eval and task "
        "pooled over seeds with 95% Wilson intervals, the difference to the baseline, and 'better'/'worse' "
        "only where the intervals separate. KEY=VALUE overrides apply to every recipe.",
    )
    recipes.add_argument("action", choices=("run", "report"), help="run NAME... | report")
    _add_config_arguments(recipes)

    config = commands.add_parser(
        "config",
        help="print the resolved, validated config as YAML",
        description="Compose the config file's defaults, apply the overrides, validate, and print the "
        "result: check what a command would run with, without running it.",
    )
    _add_config_arguments(config)

    from vla_dist.cluster.cli import (
        add_commands as add_cluster_commands,  # no Ray/torch at import
    )

    add_cluster_commands(commands, _add_config_arguments)
    add_data_commands(commands, _add_config_arguments)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML config (default: configs/quickstart.yaml, in the current directory or the vla-dist checkout)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied last, e.g. collect.episodes=4 task.name=pick_cube",
    )
    # SUPPRESS: without the flag here, the top-level --debug value is kept rather than reset to False.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
