"""`vla-dist rl` end to end on the real stack: Genesis sim actors in a Ray pool, two DeepSpeed ranks
(gloo) updating a tiny policy of each family with PPO or GRPO, weight sync through Ray's object
store, checkpoints, and a re-run that continues. The shaped reward gives the untrained policies a
gradient in a few steps (success is out of reach for them)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from vla_dist.checkpoint import manager as ckpt
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError
from vla_dist.models.build import build_policy, placeholder_manifest
from vla_dist.rl.loop import run_rl
from vla_dist.train.metrics import read_metrics

FAMILY_PRESETS = {"pi0": "tiny-pi0", "action_tokens": "tiny-openvla"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny policy of each family saved as a policy directory (what model.pretrained takes)."""
    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for family, preset in FAMILY_PRESETS.items():
        cfg = load_config(None, [f"model.preset={preset}"])
        torch.manual_seed(0)
        build_policy(cfg.model, placeholder_manifest()).save_pretrained(root / family)
        out[family] = root / family
    return out


def rl_cfg(run_dir: Path, policy: Path, family: str, *overrides: str):
    return validate(load_config(None, [
        f"run.dir={run_dir}", f"model.preset={FAMILY_PRESETS[family]}", f"model.pretrained={policy}",
        "cluster.num_cpus=2", "task.name=pick_cube", "task.image_size=32", "task.max_steps=8",
        "collect.num_actors=1", "collect.envs_per_actor=2", "collect.cpus_per_actor=1",
        "train.world_size=2", "train.cpus_per_rank=0.5", "train.zero_stage=2",
        "rl.episodes_per_iteration=4", "rl.group_size=2", "rl.minibatch_size=2", "rl.epochs=1", "rl.horizon=4",
        "rl.shaped_reward=10", "rl.lr=1e-3", "rl.iterations=2", "rl.save_every=1", *overrides]))


def weights(policy_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(policy_dir / "model.safetensors"))


@pytest.mark.parametrize(("family", "algorithm"), [
    pytest.param("pi0", "ppo", marks=[pytest.mark.heavy, pytest.mark.ci]),  # 2 RL iterations + 2 evals: ~80 s
    pytest.param("action_tokens", "grpo", marks=pytest.mark.heavy),  # token-by-token sampling: ~2x pi0's time
    pytest.param("pi0-every-step", "grpo", marks=pytest.mark.heavy),  # rl.sde_every_step: 9 steps per decision
])
def test_rl_iterations_update_sync_and_save(pretrained: dict[str, Path], local_ray: None, tmp_path: Path,
                                            family: str, algorithm: str) -> None:
    run_dir = tmp_path / "run"
    # pi0 draws each decision's stochastic denoising step (the logprob_drift check below then also
    # checks that every decision's log-probability is recomputed at its own step) and executes its
    # rollouts as evaluation does, the overlapping chunks averaged (rl.temporal_ensemble)
    # (or, every-step, makes every denoising step stochastic: the drift check then covers 9 per decision;
    # with every episode weighed once in the loss and the KL penalty to the start policy)
    extra = {"pi0": ["rl.temporal_ensemble=0.01", "rl.random_sde_step=true"],
             "pi0-every-step": ["rl.sde_every_step=true", "rl.loss_weighting=episode", "rl.kl_coef=0.1"],
             }.get(family, [])
    anchored = family == "pi0-every-step"
    family = family.removesuffix("-every-step")
    cfg = rl_cfg(run_dir, pretrained[family], family, f"rl.algorithm={algorithm}", "rl.eval_every=2",
                 "eval.episodes=2", *extra)
    report = run_rl(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    updates = [r for r in rows if "kind" not in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["iteration"] for r in updates] == [1, 2] and [r["version"] for r in updates] == [1, 2]
    assert [r["iteration"] for r in evals] == [0, 2] and all(r["eval_episodes"] == 2 for r in evals)
    for row in updates:
        assert row["episodes"] == 4 and 0 < row["env_steps"] <= 4 * 8 and row["sync_bytes"] > 0  # task.max_steps=8
        assert row["optimizer_steps"] >= 1 and row["advantage_nonzero"] > 0  # the shaped reward reached the loss
    # Iteration 1's update moved the weights (nonzero KL to the sampling policy) ...
    assert updates[0]["approx_kl"] > 0
    # ... and iteration 2's rollouts were sampled with the moved weights: their sampling-time
    # log-probabilities equal the ranks' recomputation under the updated weights. Rollouts that
    # ran stale weights (a sync that did not land) would differ by far more than rounding.
    assert updates[1]["logprob_drift"] < 1e-2, updates[1]["logprob_drift"]
    if algorithm == "ppo":
        assert updates[0]["value_loss"] > 0
    # rl.kl_coef: iteration 2 samples from moved weights, so its paths are less likely under the start policy
    assert ("reference_kl" in updates[1]) == anchored and (not anchored or updates[1]["reference_kl"] > 0)
    # Checkpoints carry the policy as a directory eval reads; its weights are not the start's.
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step_2" and report["last_iteration"] == 2
    state = json.loads((latest / "rl_state.json").read_text())
    assert state == {"iteration": 2, "version": 2}
    start, end = weights(pretrained[family]), weights(latest / "policy")
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert (run_dir / "success.png").stat().st_size > 0


@pytest.mark.heavy  # three runs
@pytest.mark.ci
def test_rerun_with_more_iterations_continues_the_uninterrupted_run(pretrained: dict[str, Path], local_ray: None,
                                                                     tmp_path: Path) -> None:
    """2 iterations in one go == 1, then the same command with rl.iterations=2 (resume auto): the
    second iteration's rollouts (seeds, exploration noise) and update (optimizer state, value head)
    continue the uninterrupted run's."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_rl(rl_cfg(whole, pretrained["pi0"], "pi0", "rl.iterations=2"))
    run_rl(rl_cfg(split, pretrained["pi0"], "pi0", "rl.iterations=1"))
    report = run_rl(rl_cfg(split, pretrained["pi0"], "pi0", "rl.iterations=2"))
    assert report["first_iteration"] == 1 and report["last_iteration"] == 2
    second = next(r for r in read_metrics(whole / "metrics.jsonl") if r["iteration"] == 2)
    resumed = read_metrics(split / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2]  # each iteration once
    for key in ("success_rate", "env_steps", "decisions", "policy_loss", "value_loss", "approx_kl"):
        assert resumed[1][key] == pytest.approx(second[key], rel=1e-4, abs=1e-6), key
    a, b = weights(whole / "checkpoints/step_2/policy"), weights(split / "checkpoints/step_2/policy")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.mark.heavy  # an actor's scene and policy: ~55 s
def test_sim_actor_refuses_a_weight_version_it_does_not_hold(pretrained: dict[str, Path], local_ray: None) -> None:
    from vla_dist.config.schema import SimSection, TaskSection
    from vla_dist.rl.rollout import Exploration
    from vla_dist.rollout.actor import SimActor
    from vla_dist.rollout.policies import PolicySource
    from vla_dist.rollout.runner import EpisodeRequest

    actor = ray.remote(SimActor).options(num_cpus=1).remote(
        TaskSection(name="pick_cube", image_size=32, max_steps=4), SimSection(), 1, "npz",
        PolicySource(kind="model", path=str(pretrained["pi0"])))
    try:
        request = [EpisodeRequest(0, "pick_cube", 7)]
        with pytest.raises(ray.exceptions.RayTaskError, match="version 0 asked of an actor holding version -1"):
            ray.get(actor.run_rollouts.remote(request, Exploration(), 0))
        ray.get(actor.set_weights.remote(3, {}))
        with pytest.raises(ray.exceptions.RayTaskError, match="version 2 asked of an actor holding version 3"):
            ray.get(actor.run_rollouts.remote(request, Exploration(), 2))
        result = ray.get(actor.run_rollouts.remote(request, Exploration(), 3))
        assert result.batch.version == 3 and result.tasks == ["pick_cube"]
        with pytest.raises(ray.exceptions.RayTaskError, match="does not have"):
            ray.get(actor.set_weights.remote(4, {"not.a.parameter": torch.zeros(1)}))
    finally:
        ray.kill(actor)


def test_rl_config_errors_name_their_keys(tmp_path: Path) -> None:
    base = [f"run.dir={tmp_path}/run"]
    with pytest.raises(ConfigError, match="rl.group_size"):
        validate(load_config(None, [*base, "rl.algorithm=grpo", "rl.group_size=1"]))
    with pytest.raises(ConfigError, match="rl.episodes_per_iteration"):
        validate(load_config(None, [*base, "rl.algorithm=grpo", "rl.group_size=3", "rl.episodes_per_iteration=8"]))
    with pytest.raises(ConfigError, match="rl.sde_step"):
        validate(load_config(None, [*base, "rl.sde_step=10"]))
    with pytest.raises(ConfigError, match="rl.sde_every_step"):
        validate(load_config(None, [*base, "rl.sde_every_step=true", "rl.random_sde_step=true"]))
    with pytest.raises(ConfigError, match="rl.kl_coef"):
        validate(load_config(None, [*base, "rl.kl_coef=-0.1"]))
    with pytest.raises(ConfigError, match="rl.loss_weighting"):
        validate(load_config(None, [*base, "rl.loss_weighting=token"]))
    with pytest.raises(ConfigError, match="rl.horizon"):
        validate(load_config(None, [*base, "rl.horizon=9"]))
    with pytest.raises(ConfigError, match="rl.algorithm"):
        validate(load_config(None, [*base, "rl.algorithm=a2c"]))
    with pytest.raises(ConfigError, match="rl.critic_warmup"):
        validate(load_config(None, [*base, "rl.iterations=2", "rl.critic_warmup=2"]))
    with pytest.raises(ConfigError, match="rl.critic_warmup"):
        validate(load_config(None, [*base, "rl.algorithm=grpo", "rl.group_size=2", "rl.critic_warmup=1",
                                    "rl.iterations=3"]))
    with pytest.raises(ConfigError, match="rl.target_kl"):
        validate(load_config(None, [*base, "rl.target_kl=-0.1"]))
    with pytest.raises(ConfigError, match="rl.temporal_ensemble"):
        validate(load_config(None, [*base, "rl.temporal_ensemble=-0.01"]))
    for bad in (["rl.value_epochs=2"], ["rl.value_epochs=2", "rl.value_lr=1e-3", "rl.value_trains_backbone=true"],
                ["rl.value_epochs=2", "rl.value_lr=1e-3", "rl.algorithm=grpo", "rl.group_size=2"]):
        with pytest.raises(ConfigError, match="rl.value_epochs"):
            validate(load_config(None, [*base, *bad]))
    for bad in ("[]", "[features,features]", "[gripper]"):
        with pytest.raises(ConfigError, match="rl.value_inputs"):
            validate(load_config(None, [*base, f"rl.value_inputs={bad}"]))
    with pytest.raises(ConfigError, match="model.pretrained"):  # before Ray starts
        run_rl(validate(load_config(None, base)))


@pytest.mark.heavy  # 2 RL iterations: ~60 s
@pytest.mark.ci
def test_critic_warmup_keeps_the_policy_and_target_kl_stops_the_update(pretrained: dict[str, Path],
                                                                        local_ray: None, tmp_path: Path) -> None:
    """Iteration 1 (critic warm-up) trains the value head only: the policy saved after it is the start,
    bit for bit. Iteration 2 updates the policy, and a KL target its first step overshoots ends the update
    at the next step (the first whose minibatch finds the policy moved) instead of the 2 epochs planned."""
    run_dir = tmp_path / "run"
    run_rl(rl_cfg(run_dir, pretrained["pi0"], "pi0", "rl.critic_warmup=1", "rl.target_kl=1e-6", "rl.epochs=2",
                  "rl.value_lr=1e-2", "rl.value_inputs=[features,state]", "rl.value_epochs=3"))
    warm, update = [r for r in read_metrics(run_dir / "metrics.jsonl") if "kind" not in r]
    # DeepSpeed's optimizer holds the value head's own learning rate beside the policy's (rl.lr=1e-3)
    assert (warm["lr"], warm["value_lr"]) == (1e-3, 1e-2) and (update["lr"], update["value_lr"]) == (1e-3, 1e-2)
    assert warm["explained_variance"] <= 1.0
    planned = 2 * max(1, warm["decisions"] // 4)  # epochs x minibatches of 2 decisions on each of 2 ranks
    assert planned >= 4, warm["decisions"]
    assert warm["critic_warmup"] and not warm["kl_stopped"] and warm["optimizer_steps"] == planned
    assert warm["value_loss"] > 0
    # rl.value_epochs: value-only passes before the update fit the returns (their loss falls) and end with
    # the policy's rate restored (read back above); the policy's 0-rate steps moved nothing (below)
    assert warm["value_fit_steps"] == 3 * max(1, (warm["decisions"] // 2) // 2)
    assert update["value_fit_last"] < update["value_fit_first"] and warm["value_fit_last"] < warm["value_fit_first"]
    start, after_warmup = weights(pretrained["pi0"]), weights(run_dir / "checkpoints/step_1/policy")
    assert all(torch.equal(start[k], after_warmup[k]) for k in start)
    assert not update["critic_warmup"] and update["kl_stopped"] and update["optimizer_steps"] == 2
    assert update["approx_kl"] > 0
    end = weights(run_dir / "checkpoints/step_2/policy")
    assert any(not torch.equal(start[k], end[k]) for k in start)


def _kill_first_rollout(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first sim actor process of this test session's Ray (a descendant of this process:
    never another run's on the same machine) seen inside run_rollouts (Ray titles it so), once."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for proc in me.children(recursive=True):
            try:
                title = " ".join(proc.cmdline())  # the title is in argv (comm is cut at 15 characters)
            except psutil.Error:
                continue
            if title.startswith("ray::SimActor.run_rollouts"):
                proc.kill()
                killed.append(proc.pid)
                return
        time.sleep(0.05)


@pytest.mark.heavy  # two runs, one of them through an actor restart (a Genesis scene rebuilt)
def test_sim_actor_killed_mid_rollout_reruns_its_episodes(pretrained: dict[str, Path], local_ray: None,
                                                          tmp_path: Path) -> None:
    """Ray restarts the killed actor, the pool re-sends it the current weights before any work, and
    the chunk it was running is re-run whole: the iteration counts each episode once, with the
    outcome an uninterrupted run gets (same seeds, same exploration streams)."""
    straight = run_rl(rl_cfg(tmp_path / "straight", pretrained["pi0"], "pi0", "rl.iterations=1"))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_rollout, args=(stop, killed), daemon=True)
    killer.start()
    try:
        report = run_rl(rl_cfg(tmp_path / "killed", pretrained["pi0"], "pi0", "rl.iterations=1"))
    finally:
        stop.set()
        killer.join()
    assert killed, "no sim actor was seen in run_rollouts"
    row = read_metrics(tmp_path / "killed" / "metrics.jsonl")[0]
    reference = read_metrics(tmp_path / "straight" / "metrics.jsonl")[0]
    assert row["actor_failures"] == 1 and row["chunks_retried"] >= 1, row
    assert row["episodes"] == reference["episodes"] == 4
    for key in ("env_steps", "decisions", "successes", "policy_loss", "logprob_drift"):
        assert row[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    assert report["last_iteration"] == straight["last_iteration"] == 1


@pytest.mark.heavy
def test_lora_rl_syncs_the_adapter_only_and_saves_an_evaluable_policy(pretrained: dict[str, Path],
                                                                     local_ray: None, tmp_path: Path) -> None:
    """LoRA at ZeRO-3: the sync carries the adapter (a small fraction of the model's bytes), the
    checkpoint's policy/ is the base plus adapter/, and loading it (merging the adapter) gives weights
    that differ from the start only where LoRA adapts."""
    from vla_dist.checkpoint.export import export_checkpoint
    from vla_dist.models.build import load_policy

    run_dir = tmp_path / "lora"
    report = run_rl(rl_cfg(run_dir, pretrained["pi0"], "pi0", "train.lora.enabled=true", "train.zero_stage=3",
                           "rl.iterations=1"))
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    full_bytes = sum(t.numel() * t.element_size() for t in weights(pretrained["pi0"]).values())
    assert 0 < row["sync_bytes"] < full_bytes / 10, (row["sync_bytes"], full_bytes)
    assert row["approx_kl"] > 0 and row["logprob_drift"] < 1e-2
    policy_dir = Path(report["policy"])
    assert (policy_dir / "adapter" / "adapter_model.safetensors").is_file()
    start = load_policy(pretrained["pi0"]).state_dict()
    tuned = load_policy(policy_dir).state_dict()  # base + adapter merged
    changed = [name for name in start if not torch.equal(start[name], tuned[name])]
    assert changed and not any("vision" in name for name in changed), changed[:5]  # LoRA targets the LMs only
    merged = export_checkpoint(run_dir, tmp_path / "merged", merge_lora=True)
    assert merged["kind"] == "merged" and not (tmp_path / "merged" / "adapter").exists()
    again = load_policy(tmp_path / "merged").state_dict()
    for name in changed[:5]:
        torch.testing.assert_close(again[name], tuned[name])


def test_rollout_summary_counts_each_repeated_layout() -> None:
    """GRPO on a practised pool: each layout's successes of its tries, so a layout that gives no
    signal (all succeed or all fail) and one that RL moves can be told apart in metrics.jsonl."""
    from vla_dist.rl.loop import rollout_summary
    from vla_dist.rl.trajectories import Trajectories

    success = torch.tensor([True, False, True, True, False, False])
    e, d = 6, 2
    traj = Trajectories(images=torch.zeros(e, d, 1, 2, 2, 3, dtype=torch.uint8), states=torch.zeros(e, d, 1),
                        instructions=["pick"] * e, tasks=["pick_cube"] * e, seeds=[7, 7, 9, 9, 11, 11],
                        groups=torch.tensor([0, 0, 1, 1, 2, 2]), sample_log_probs=torch.zeros(e, d),
                        valid=torch.ones(e, d, dtype=torch.bool), executed=torch.ones(e, d, 4, dtype=torch.bool),
                        rewards=torch.zeros(e, d), dones=torch.zeros(e, d, dtype=torch.bool), success=success,
                        lengths=torch.full((e,), 8), reach=None, version=1)
    summary = rollout_summary(traj, ["pick_cube"])
    assert summary["successes"] == 3 and summary["per_layout_successes"] == {"7": "1/2", "9": "2/2", "11": "0/2"}
    fresh = rollout_summary(dataclasses.replace(traj, seeds=[1, 2, 3, 4, 5, 6]), ["pick_cube"])
    assert "per_layout_successes" not in fresh  # every layout tried once: nothing to add
