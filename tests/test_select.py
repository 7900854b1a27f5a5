"""Active data selection (`vla-dist select`, vla_dist/select.py) on the quickstart's real episodes and
a real tiny policy: the subset dataset is the pool's bytes, the choice follows the scores (episodes
made hard on purpose come first under the policy's loss), random is the seeded control, and bad
inputs exit 2 before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.config import load_config
from vla_dist.data.codec import encode_episode
from vla_dist.data.manifest import read_manifest, write_manifest
from vla_dist.data.reader import iter_episodes
from vla_dist.data.shards import EpisodeShardWriter
from vla_dist.data.stats import compute_stats
from vla_dist.data.subset import subset_dataset
from vla_dist.select import choose

HARD = 2  # pool episodes whose actions are replaced by ones no policy could have learned


def test_choose_takes_the_highest_scores_in_pool_order() -> None:
    ids = ["a", "b", "c", "d", "e"]
    assert choose(ids, {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.9, "e": 0.0}, 3) == ["b", "c", "d"]
    assert choose(ids, dict.fromkeys(ids, 1.0), 2) == ["a", "b"]  # ties: the earlier episodes


def test_subset_copies_the_chosen_episodes_and_recomputes_statistics(quickstart_run, tmp_path: Path) -> None:
    _, data_dir, _ = quickstart_run
    pool = list(iter_episodes(data_dir))
    ids = [pool[1].episode_id, pool[4].episode_id, pool[6].episode_id]
    manifest = subset_dataset(data_dir, tmp_path / "sub", list(reversed(ids)), extra={"selected_by": "test"})
    assert manifest["episodes"] == 3 and manifest["extra"]["selected_by"] == "test"
    assert manifest["extra"]["appearance"] == read_manifest(data_dir)["extra"]["appearance"]  # carried over
    read_back = list(iter_episodes(tmp_path / "sub"))
    assert [ep.episode_id for ep in read_back] == ids  # the pool's order
    for got, want in zip(read_back, (pool[1], pool[4], pool[6]), strict=True):
        np.testing.assert_array_equal(got.actions, want.actions)
        for camera in want.frames:
            np.testing.assert_array_equal(got.frames[camera], want.frames[camera])  # bytes copied, not re-encoded
    expected = compute_stats([ep.actions for ep in read_back])
    np.testing.assert_allclose(manifest["action_stats"]["mean"], expected["mean"], rtol=1e-6)
    with pytest.raises(ValueError, match="not in"):
        subset_dataset(data_dir, tmp_path / "bad", [ids[0], "no-such-episode"])
    assert not list((tmp_path / "bad").glob("*.tar")) and not (tmp_path / "bad" / "manifest.json").exists()


def _pool_with_hard_episodes(data_dir: Path, out: Path) -> list[str]:
    """The quickstart episodes, HARD of them with actions far outside anything demonstrated."""
    manifest = read_manifest(data_dir)
    episodes = list(iter_episodes(data_dir))
    hard = [episodes[2].episode_id, episodes[5].episode_id]
    rng = np.random.default_rng(0)
    with EpisodeShardWriter(out, max_episodes=4) as writer:
        for episode in episodes:
            if episode.episode_id in hard:
                episode.actions = rng.normal(0.0, 0.5, episode.actions.shape).astype(np.float32)
            writer.write(encode_episode(episode, "npz"))
    write_manifest(out, shards=writer.records, episodes=len(episodes), frames=manifest["frames"],
                   tasks=manifest["tasks"], action_space=manifest["action_space"],
                   state_space=manifest["state_space"], action_stats=manifest["action_stats"],
                   state_stats=manifest["state_stats"], cameras=manifest["cameras"], image_size=manifest["image_size"],
                   image_codec="npz", fps=manifest["fps"], extra=manifest["extra"])
    return hard


@pytest.fixture(scope="module")
def tiny_policy(quickstart_run, tmp_path_factory) -> Path:
    """An untrained tiny pi0 normalized by the quickstart's statistics."""
    import torch

    from vla_dist.models import build_policy

    _, data_dir, _ = quickstart_run
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "tiny-pi0"
    build_policy(load_config(None, []).model, read_manifest(data_dir)).save_pretrained(path)
    return path


def test_select_by_loss_chooses_the_episodes_the_policy_fits_worst(quickstart_run, tiny_policy, tmp_path: Path,
                                                                   capsys) -> None:
    _, data_dir, _ = quickstart_run
    pool = tmp_path / "pool"
    hard = _pool_with_hard_episodes(data_dir, pool)
    seed_set = tmp_path / "seed_set"
    ids = [ep.episode_id for ep in iter_episodes(pool, decode_images=False)]
    subset_dataset(pool, seed_set, [ids[0]])  # already trained on: never a candidate, kept ahead of the choice
    args = ["select", f"select.pool={pool}", "select.score=loss", "select.episodes=3", f"eval.checkpoint={tiny_policy}",
            f"select.exclude=[{seed_set}]", f"select.keep=[{seed_set}]"]
    assert main([*args, f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'chosen'}"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    scores = {row["episode_id"]: row["score"] for row in report["scores"]}
    chosen = [row["episode_id"] for row in report["scores"] if row["chosen"]]
    assert ids[0] not in scores and report["candidates"] == len(ids) - 1 and report["excluded"] == 1
    assert set(hard) <= set(chosen) and len(chosen) == 3  # the corrupted episodes score highest
    assert min(scores[i] for i in hard) > max(s for i, s in scores.items() if i not in hard)
    assert chosen == choose(list(scores), scores, 3)  # the choice is what the scores say
    assert [ep.episode_id for ep in iter_episodes(tmp_path / "chosen", decode_images=False)] == [ids[0], *chosen]
    assert (tmp_path / "run" / "scores.png").stat().st_size > 5_000
    assert "select done" in capsys.readouterr().out
    # the same run.seed scores the same way
    assert main([*args, f"run.dir={tmp_path / 'again'}", f"data.dir={tmp_path / 'chosen2'}"]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [row["score"] for row in again["scores"]] == [row["score"] for row in report["scores"]]


def test_select_by_disagreement_and_at_random(quickstart_run, tiny_policy, tmp_path: Path) -> None:
    _, data_dir, _ = quickstart_run
    common = [f"select.pool={data_dir}", "select.episodes=4"]
    assert main(["select", *common, "select.score=disagreement", "select.samples=3", f"eval.checkpoint={tiny_policy}",
                 f"run.dir={tmp_path / 'dis'}", f"data.dir={tmp_path / 'dis_data'}"]) == 0
    report = json.loads((tmp_path / "dis" / "report.json").read_text())
    assert all(row["score"] > 0 for row in report["scores"]) and report["episodes"] == 4
    assert report["mean_score_chosen"] > report["mean_score_rest"]
    picks = []
    for seed in (0, 0, 1):
        run_dir = tmp_path / f"random_{len(picks)}"
        assert main(["select", *common, "select.score=random", f"run.seed={seed}", f"run.dir={run_dir}",
                     f"data.dir={run_dir / 'data'}"]) == 0
        picks.append([row["episode_id"] for row in json.loads((run_dir / "report.json").read_text())["scores"]
                      if row["chosen"]])
    assert picks[0] == picks[1] and picks[0] != picks[2]  # seeded by run.seed


@pytest.mark.parametrize(("override", "message"), [
    ("select.score=loss", "eval.checkpoint"),  # a policy's score needs the policy
    ("data.dir=POOL", "data.dir"),  # the choice would overwrite its own pool
    ("select.exclude=[/nonexistent]", "select.exclude[0]"),
    ("select.episodes=100", "select.episodes"),  # more than the pool holds
    ("select.score=best", "select.score"),
])
def test_bad_select_inputs_exit_2_naming_the_key(quickstart_run, tmp_path: Path, capsys, override: str,
                                                 message: str) -> None:
    _, data_dir, _ = quickstart_run
    override = override.replace("POOL", str(data_dir))
    args = ["select", f"select.pool={data_dir}", "select.score=random", f"run.dir={tmp_path}",
            f"data.dir={tmp_path / 'out'}", override]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
