"""`vla-dist eval`: closed-loop success on the real Ray sim-actor pool, expert and VLA policies."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_dist.cli import main
from vla_dist.config import load_config
from vla_dist.data import iter_episodes, read_manifest
from vla_dist.models import PI0Policy, PolicyBatch, build_policy
from vla_dist.rollout.collect import episode_seed
from vla_dist.rollout.evaluate import eval_requests, wilson_interval
from vla_dist.rollout.runner import EpisodeRequest

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]


def wilson_reference(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval from its definition, not the closed form the code uses: the rates p
    whose normal test does not reject, |successes/n - p| = z * sqrt(p(1 - p)/n), the two roots of
    (1 + z^2/n) p^2 - (2 successes/n + z^2/n) p + (successes/n)^2 = 0."""
    rate = successes / n
    roots = np.roots([1 + z * z / n, -(2 * rate + z * z / n), rate * rate]).real
    return float(roots.min()), float(roots.max())


@pytest.mark.heavy  # a collection and an eval of the same layouts: ~60 s
def test_expert_eval_matches_its_collection_success(tmp_path: Path, local_ray: None) -> None:
    assert main(["eval", "eval.policy=expert", "eval.episodes=2", f"run.dir={tmp_path}", "eval.num_videos=2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["policy"] == "expert" and report["episodes"] == 6
    assert report["success_rate"] >= 5 / 6  # the expert collects at 98-100% per task
    for task, stats in report["per_task"].items():
        assert stats["episodes"] == 2 and stats["success_rate"] == stats["successes"] / 2, task
        assert stats["ci95"] == [round(bound, 4) for bound in wilson_reference(stats["successes"], 2)], task
    assert report["successes"] == sum(stats["successes"] for stats in report["per_task"].values())
    assert report["success_rate"] == report["successes"] / 6
    assert report["ci95"] == [round(bound, 4) for bound in wilson_reference(report["successes"], 6)]
    videos = sorted(p.name for p in (tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(name.endswith(("-success.mp4", "-failure.mp4")) for name in videos)


@pytest.mark.heavy  # closed-loop episodes of a policy: ~70 s
def test_untrained_policy_eval_is_near_zero(tmp_path: Path, quickstart_run: Quickstart, local_ray: None) -> None:
    _, data_dir, _ = quickstart_run
    args = ["eval", "eval.episodes=1", "task.max_steps=20", f"data.dir={data_dir}", f"run.dir={tmp_path}",
            "model.preset=tiny-pi0"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["policy"] == "model" and report["episodes"] == 3
    assert report["success_rate"] <= 1 / 3
    assert report["decode_calls"] > 0 and report["decode_ms_per_chunk"] > 0
    assert (tmp_path / "untrained_policy" / "vla_dist.json").is_file()


@pytest.mark.parametrize("preset", ["tiny-pi0", "tiny-openvla"])
def test_policy_trains_on_windows_from_real_shards(preset: str, quickstart_run: Quickstart) -> None:
    """A batch of (observation, next chunk) windows read from collected shards: finite loss and
    gradients, and predictions un-normalized into the dataset's action range."""
    _, data_dir, _ = quickstart_run
    manifest = read_manifest(data_dir)
    cfg = load_config(None, [f"model.preset={preset}"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model, manifest)
    chunk = policy.chunk_size
    images, states, actions, masks, texts = [], [], [], [], []
    for ep in list(iter_episodes(data_dir))[:4]:
        t = ep.num_frames // 2
        future = ep.actions[t : t + chunk]
        pad = chunk - len(future)
        images.append(np.stack([ep.frames[cam][t] for cam in manifest["cameras"]]))
        states.append(ep.state[t])
        actions.append(np.concatenate([future, np.zeros((pad, future.shape[1]), np.float32)]))
        masks.append(np.arange(chunk) < chunk - pad)
        texts.append(ep.instruction)
    batch = PolicyBatch(
        images=torch.from_numpy(np.stack(images)), state=torch.from_numpy(np.stack(states)), instructions=texts,
        actions=torch.from_numpy(np.stack(actions)), action_mask=torch.from_numpy(np.stack(masks)),
    )
    loss = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in policy.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Predictions are the decoder's normalized output mapped back with the dataset's own q01/q99, by
    # hand here: [-1, 1] -> [q01, q99] linearly, clipped (a constant dim gives its one value).
    noise = torch.randn(4, chunk, 7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        predicted = policy.predict_chunk(batch, noise)
        if isinstance(policy, PI0Policy):
            prefix = policy.prepare_prefix(batch)
            padded = torch.nn.functional.pad(noise, (0, policy.max_action_dim - 7))
            norm = policy.hf_model.sample_actions(**prefix, noise=padded, num_steps=policy.spec.num_inference_steps)
            norm = norm[..., :7].float()
        else:  # bin b of 256 over [-1, 1] has its centre at -1 + (2b + 1) / 256
            norm = -1 + (2 * policy.predict_bins(batch).double() + 1) / 256
    q01 = torch.tensor(manifest["action_stats"]["q01"], dtype=torch.float64)
    q99 = torch.tensor(manifest["action_stats"]["q99"], dtype=torch.float64)
    expected = q01 + (norm.double().clamp(-1, 1) + 1) / 2 * (q99 - q01)
    assert predicted.shape == (4, chunk, 7)
    torch.testing.assert_close(predicted.double(), expected, rtol=0, atol=1e-6)


def test_wilson_interval() -> None:
    # Published values (z = 1.96), to 4 decimals: 0/n has upper bound z^2 / (n + z^2), n/n lower n / (n + z^2).
    known = {(35, 50): (0.5625, 0.8090), (0, 20): (0.0, 0.1611), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
             (5, 10): (0.2366, 0.7634), (1, 3): (0.0615, 0.7923)}
    for (successes, n), interval in known.items():
        assert wilson_interval(successes, n) == pytest.approx(interval, abs=5e-5), (successes, n)
    for successes, n in [(0, 1), (1, 2), (3, 7), (17, 40), (99, 100), (250, 1000)]:
        assert wilson_interval(successes, n) == pytest.approx(wilson_reference(successes, n), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no episode: nothing known


def test_eval_seeds_are_never_collection_seeds() -> None:
    """Held-out evaluation never scores a layout collection drew: for run seeds 0-2, 6000 collection
    attempts (2000 episodes at the default max_attempts_factor 3) and 500 eval episodes per task.
    The collection side is taken from eval.seeds=collection, which must reproduce collect's seeds."""
    collected, held_out = set(), set()
    for run_seed in range(3):
        base = [f"run.seed={run_seed}", "task.name=all"]
        _, replayed = eval_requests(load_config(None, [*base, "eval.seeds=collection"]), 2000)
        assert [r.seed for r in replayed] == [episode_seed(run_seed, i) for i in range(6000)]
        tasks, requests = eval_requests(load_config(None, base), 500)
        assert tasks == ["pick_cube", "push_cube", "stack_cube"] and len(requests) == 1500
        assert [r.task for r in requests[:4]] == ["pick_cube", "push_cube", "stack_cube", "pick_cube"]
        seeds = [r.seed for r in requests]
        assert len(set(seeds)) == len(seeds)  # no layout twice within one eval either
        assert seeds == [r.seed for r in eval_requests(load_config(None, base), 500)[1]]  # the same every time
        collected.update(r.seed for r in replayed)
        held_out.update(seeds)
    assert len(collected) == 18000 and len(held_out) == 4500
    assert not collected & held_out  # across run seeds too: data collected under one, evaluated under another


@pytest.mark.heavy  # a cold inductor compile inside a Genesis actor: minutes on 2 cores
@pytest.mark.parametrize("preset", ["tiny-pi0", "tiny-openvla"])
def test_compiled_decoding_in_a_sim_actor_matches_eager(preset: str, tmp_path: Path, quickstart_run: Quickstart,
                                                        local_ray: None) -> None:
    """`model.compile=true` in eval: the compiled decoder runs inside a real Genesis Ray actor (where
    Genesis' stdlib-distutils import once broke every inductor compile) and drives the same closed-loop
    episode as eager decoding, compile time reported apart from the per-chunk latency."""
    import ray

    from vla_dist.rollout.actor import SimActor
    from vla_dist.rollout.evaluate import resolve_policy

    _, data_dir, _ = quickstart_run
    cfg = load_config(None, [f"model.preset={preset}", f"data.dir={data_dir}", f"run.dir={tmp_path}",
                             "task.max_steps=12", "model.compile=true"])
    compiled_source = resolve_policy(cfg)
    eager_source = dataclasses.replace(compiled_source, compile=False)
    request = [EpisodeRequest(0, "pick_cube", 1234)]
    results = {}
    for name, source in (("compiled", compiled_source), ("eager", eager_source)):
        actor = ray.remote(SimActor).options(num_cpus=1).remote(cfg.task, cfg.sim, 1, "npz", source)
        try:
            results[name] = ray.get(actor.run_chunk.remote(request), timeout=900)
        finally:
            ray.kill(actor)
    compiled, eager = results["compiled"], results["eager"]
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    assert compiled.decode_calls == eager.decode_calls > 0
    # Per-chunk latency excludes the compile (seconds) that the first call paid.
    assert compiled.decode_seconds / compiled.decode_calls < compiled.compile_seconds
    np.testing.assert_allclose(compiled.outcomes[0].actions, eager.outcomes[0].actions, atol=1e-3)
