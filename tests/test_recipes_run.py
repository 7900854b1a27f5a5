"""`vla-dist recipes run` for real at tiny size, as a user types it: the baseline and an RL recipe
that starts from the baseline's policy, on Genesis + Ray + DeepSpeed, then the report. A second run
that adds an SFT recipe runs only that recipe and keeps every finished stage. (An evaluation
variant's overrides, e.g. a held-out phrasing, are checked in the plan: tests/test_recipes_plan.py;
what each recipe's mechanism does, in its own test: tests/test_augment.py, tests/test_models.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import QUICKSTART_EPISODES, REPO_ROOT


def _recipes(root: Path, data_dir: Path, *names: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    tiny = [
        f"recipes.dir={root}", "recipes.seeds=[0]",
        f"data.dir={data_dir}", f"collect.episodes={QUICKSTART_EPISODES}", "data.num_workers=0",
        "data.shuffle_buffer=64", "cluster.num_cpus=2", "collect.num_actors=1", "collect.envs_per_actor=2",
        "train.steps=4", "train.save_every=4", "train.micro_batch_size=4", "train.warmup_steps=1", "train.log_every=1",
        "eval.episodes=2", "eval.num_videos=0", "task.max_steps=8",
        "rl.iterations=1", "rl.episodes_per_iteration=2", "rl.minibatch_size=2", "rl.epochs=1", "rl.save_every=1",
    ]
    command = [sys.executable, "-m", "vla_dist", "recipes", "run", *names, *tiny, *extra]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500, check=False)


@pytest.mark.heavy
@pytest.mark.ci
@pytest.mark.timeout(2400)  # 7 stages, then 2 and 5 more, each starting its own actors or ranks
def test_recipes_run_and_report_from_real_tiny_runs(
    quickstart_run: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    _, data_dir, _ = quickstart_run
    root = tmp_path / "recipes"
    proc = _recipes(root, data_dir, "rl-ppo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((root / "recipes.json").read_text())
    rows = {(r["recipe"], r["eval"]): r for r in summary["rows"]}
    assert set(rows) == {(name, "default") for name in ("base-pick", "rl-ppo")}
    assert all(r["episodes"] == 2 and r["task"] == "all" for r in rows.values())
    assert rows[("base-pick", "default")]["effect"] == "baseline"
    assert rows[("base-pick", "default")]["train_samples"] == 4 * 4
    rl_row = rows[("rl-ppo", "default")]
    assert rl_row["rollout_episodes"] == 2 and rl_row["start_from"] == "base-pick"
    # each stage ran what its recipe says: RL from the baseline's exported policy at the same seed,
    # every evaluation on that seed's held-out layouts
    evaluation = yaml.safe_load((root / "rl-ppo" / "seed_0" / "eval-default" / "config.yaml").read_text())
    assert evaluation["run"]["seed"] == 0 and evaluation["eval"]["seeds"] == "heldout"
    # every episode's outcome is recorded, so the two recipes are compared layout by layout
    outcomes = json.loads((root / "rl-ppo" / "seed_0" / "eval-default" / "report.json").read_text())["outcomes"]
    base_outcomes = json.loads((root / "base-pick" / "seed_0" / "eval-default" / "report.json").read_text())["outcomes"]
    assert [(o["index"], o["seed"]) for o in outcomes] == [(o["index"], o["seed"]) for o in base_outcomes]
    assert sum(o["success"] for o in outcomes) == rl_row["successes"]
    paired = rl_row["paired_vs_baseline"]
    assert paired["episodes"] == 2 and paired["lost"] + paired["gained"] <= 2
    rl = yaml.safe_load((root / "rl-ppo" / "seed_0" / "rl" / "config.yaml").read_text())
    assert rl["model"]["pretrained"] == str(root / "base-pick" / "seed_0" / "eval-default" / "policy")
    text = (root / "recipes.md").read_text()
    assert "## eval: default" in text and "| rl-ppo (from base-pick) | all |" in text
    assert (root / "recipes.png").is_file()

    # a second run adding a recipe: only that recipe's stages run, every finished one is kept
    again = _recipes(root, data_dir, "rl-ppo", "embodiment-no-proprio")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    kept = [line for line in again.stdout.splitlines() if "exists: keeping it" in line]
    assert len(kept) == 2 * 2, again.stdout[-3000:]  # two recipes' train/rl and evaluation each
    assert not any("embodiment-no-proprio" in line for line in kept)
    rows = {(r["recipe"], r["eval"]) for r in json.loads((root / "recipes.json").read_text())["rows"]}
    assert ("embodiment-no-proprio", "default") in rows and len(rows) == 3
    blind = json.loads((root / "embodiment-no-proprio" / "seed_0" / "eval-default" / "policy" / "vla_dist.json")
                       .read_text())
    assert blind["state_inputs"] == []  # the recipe's policy reads no proprioception
    trained = yaml.safe_load((root / "embodiment-no-proprio" / "seed_0" / "train" / "config.yaml").read_text())
    assert trained["model"]["state_inputs"] == [] and trained["run"]["seed"] == 0

    # the baseline trained longer (train.steps raised: it resumes): its evaluations and the RL run that
    # started from its policy are set aside and run again; nothing of the old policy stays current
    longer = _recipes(root, data_dir, "rl-ppo", extra=("train.steps=6",))
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    moved = [line for line in longer.stdout.splitlines() if "moved to" in line]
    redone = ("base-pick/seed_0/eval-default", "rl-ppo/seed_0/rl", "rl-ppo/seed_0/eval-default")
    assert sorted(line.split()[0] for line in moved) == sorted(str(root / path) for path in redone)
    assert json.loads((root / "base-pick" / "seed_0" / "train" / "report.json").read_text())["last_step"] == 6
    policy = root / "base-pick" / "seed_0" / "eval-default" / "policy" / "model.safetensors"
    old_policy = root / "base-pick" / "seed_0" / "eval-default.stale" / "policy" / "model.safetensors"
    assert policy.read_bytes() != old_policy.read_bytes()  # the evaluation ran the 6-step policy
    assert (root / "rl-ppo" / "seed_0" / "rl" / "report.json").is_file()
    assert (root / "rl-ppo" / "seed_0" / "eval-default" / "report.json").is_file()
    assert len([line for line in longer.stdout.splitlines() if "exists: keeping it" in line]) == 0
