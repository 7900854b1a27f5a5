"""`vla-dist dagger`: the aggregate dataset, the checks that fail before any work, and (heavy, in CI)
rounds for real at tiny size: rollouts of a saved policy through sim actors labelled by the expert,
aggregated with the demonstrations, trained on with DeepSpeed, exported, resumed. The expert's
labels on the visited states are checked in tests/test_sim.py (test_dagger_labels_...)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.data.aggregate import aggregate_datasets
from vla_dist.data.reader import iter_episodes

from .conftest import QUICKSTART_EPISODES, REPO_ROOT

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]


def _part(data_dir: Path, out: Path, shard_names: list[str]) -> Path:
    """A dataset holding some of `data_dir`'s shards (copied, renumbered from 0), with its manifest."""
    from vla_dist.data.manifest import read_manifest, write_manifest

    manifest = read_manifest(data_dir)
    out.mkdir()
    records, tasks = [], {}
    for number, name in enumerate(shard_names):
        record = next(r for r in manifest["shards"] if r["name"] == name)
        records.append({**record, "name": f"shard-{number:06d}.tar"})
        shutil.copy(data_dir / name, out / records[-1]["name"])
    for episode in iter_episodes(out, decode_images=False, verify="none"):
        tasks[episode.task] = tasks.get(episode.task, 0) + 1
    keys = ("action_space", "state_space", "action_stats", "state_stats", "cameras", "image_size", "image_codec", "fps")
    write_manifest(out, shards=records, episodes=sum(r["episodes"] for r in records), frames=0, tasks=tasks,
                   **{key: manifest[key] for key in keys})
    return out


def test_aggregate_reads_as_the_union_and_refuses_unlike_data(quickstart_run: Quickstart, tmp_path: Path) -> None:
    _, data_dir, _ = quickstart_run
    names = [record["name"] for record in json.loads((data_dir / "manifest.json").read_text())["shards"]]
    first, second = _part(data_dir, tmp_path / "a", names[:1]), _part(data_dir, tmp_path / "b", names[1:])
    manifest = aggregate_datasets(tmp_path / "union", [first, second])
    assert manifest["episodes"] == QUICKSTART_EPISODES and sum(manifest["tasks"].values()) == QUICKSTART_EPISODES
    links = sorted((tmp_path / "union").glob("shard-*.tar"))
    assert len(links) == len(names) and all(link.is_symlink() for link in links)  # nothing copied
    assert {link.resolve().parent for link in links} == {first.resolve(), second.resolve()}
    union = [ep.episode_id for ep in iter_episodes(tmp_path / "union", decode_images=False, verify="sha256")]
    assert sorted(union) == sorted(ep.episode_id for ep in iter_episodes(data_dir, decode_images=False))
    again = aggregate_datasets(tmp_path / "union", [second])  # rewriting drops the earlier links
    assert len(list((tmp_path / "union").glob("shard-*.tar"))) == len(names) - 1
    assert again["episodes"] == sum(1 for _ in iter_episodes(tmp_path / "union", decode_images=False))
    other = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**other, "image_size": other["image_size"] * 2}))
    with pytest.raises(ValueError, match="image_size"):
        aggregate_datasets(tmp_path / "bad", [first, second])


@pytest.mark.parametrize(("argv", "message"), [
    (["dagger", "model.pretrained=/nonexistent/policy"], "model.pretrained"),
    (["dagger", "dagger.rounds=0"], "dagger.rounds"),
    (["dagger", "dagger.episodes_per_round=0"], "dagger.episodes_per_round"),
    (["collect", "collect.relabel_policy=/nonexistent/policy"], "collect.relabel_policy"),
])
def test_bad_dagger_inputs_exit_2_before_any_work(argv: list[str], message: str, tmp_path: Path,
                                                  quickstart_run: Quickstart,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, data_dir, _ = quickstart_run
    data = tmp_path / "new-data" if argv[0] == "collect" else data_dir
    assert main([*argv, f"run.dir={tmp_path / 'run'}", f"data.dir={data}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "round_1").exists() and not list((tmp_path).glob("new-data/shard-*"))


def _saved_untrained_policy(data_dir: Path, out: Path) -> Path:
    import torch

    from vla_dist.config import load_config, validate
    from vla_dist.data.manifest import read_manifest
    from vla_dist.models import build_policy

    torch.manual_seed(0)
    build_policy(validate(load_config(None, [])).model, read_manifest(data_dir)).save_pretrained(out)
    return out


def _dagger(run_dir: Path, data_dir: Path, start: Path) -> subprocess.CompletedProcess:
    tiny = [f"run.dir={run_dir}", f"data.dir={data_dir}", f"model.pretrained={start}", "task.name=pick_cube",
            "task.max_steps=8", "cluster.num_cpus=2", "collect.num_actors=1", "collect.envs_per_actor=2",
            "collect.num_videos=0", "eval.temporal_ensemble=0", "dagger.rounds=2", "dagger.episodes_per_round=2",
            "dagger.train_steps=2", "train.save_every=2", "train.micro_batch_size=4", "train.warmup_steps=1",
            "train.log_every=1", "train.world_size=1", "data.num_workers=0", "data.shuffle_buffer=64"]
    return subprocess.run([sys.executable, "-m", "vla_dist", "dagger", *tiny], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1500, check=False)


@pytest.mark.heavy
@pytest.mark.ci
@pytest.mark.timeout(1800)
def test_dagger_rounds_label_aggregate_train_and_resume(quickstart_run: Quickstart, tmp_path: Path) -> None:
    from vla_dist.data.manifest import read_manifest
    from vla_dist.models import load_policy

    _, data_dir, _ = quickstart_run
    start = _saved_untrained_policy(data_dir, tmp_path / "start")
    run_dir = tmp_path / "dagger"
    proc = _dagger(run_dir, data_dir, start)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["last_round"] == 2 and [r["rollouts"] for r in report["rounds"]] == [2, 2]
    assert report["rollout_episodes"] == 4 and report["train_samples"] == 2 * 2 * 4
    assert all(0.0 <= r["ci95"][0] <= r["success_rate"] <= r["ci95"][1] <= 1.0 for r in report["rounds"])
    # each round rolled out the previous round's policy, and every rollout is kept, failed or not
    labels = [read_manifest(run_dir / f"round_{k}" / "labels") for k in (1, 2)]
    assert [m["extra"]["relabel_policy"] for m in labels] == [str(start), str(run_dir / "round_1" / "policy")]
    assert [m["episodes"] for m in labels] == [2, 2]
    # on layouts of their own: no demonstration's, and not the other round's
    seeds = [{ep.seed for ep in iter_episodes(run_dir / f"round_{k}" / "labels", decode_images=False)} for k in (1, 2)]
    demos = {ep.seed for ep in iter_episodes(data_dir, decode_images=False)}
    assert not (seeds[0] & seeds[1]) and not ((seeds[0] | seeds[1]) & demos)
    # the labels are the expert's: within its 3 cm step, fingers fully open or closed
    for episode in iter_episodes(run_dir / "round_2" / "labels", decode_images=False):
        assert (abs(episode.actions[:, 6]) == 1.0).all()
        assert (episode.actions[:, :3] ** 2).sum(axis=1).max() ** 0.5 <= 0.03 + 1e-6
    # round 2 trained round 1's policy on the demonstrations and both rounds' labels
    assert read_manifest(run_dir / "round_2" / "data")["episodes"] == QUICKSTART_EPISODES + 4
    trained = (run_dir / "round_2" / "train" / "config.yaml").read_text()
    assert f"pretrained: {run_dir / 'round_1' / 'policy'}" in trained
    assert (run_dir / "policy").resolve() == (run_dir / "round_2" / "policy").resolve()
    assert load_policy(run_dir / "policy").chunk_size > 0
    assert (run_dir / "dagger.png").stat().st_size > 0

    again = _dagger(run_dir, data_dir, start)  # finished rounds are kept: no rollout, no training
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rollouts of" not in again.stdout and again.stdout.count("finished before, keeping it") == 2
    assert json.loads((run_dir / "report.json").read_text())["rounds"] == report["rounds"]  # measured walls kept
    # the labels are not what executed: replaying them is refused, naming why
    replay = subprocess.run([sys.executable, "-m", "vla_dist", "replay", f"data.dir={run_dir / 'round_1' / 'labels'}",
                             f"run.dir={tmp_path / 'replay'}", "task.name=pick_cube"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert replay.returncode == 2 and "DAgger labels" in replay.stderr
