"""Training-time evals (train.eval_every), keep_best, TensorBoard and W&B logging of `vla-dist train`.

Real stack: the quickstart dataset collected by real Genesis sim actors, one real DeepSpeed ZeRO-3
rank in a Ray actor, the eval on a real sim-actor pool while the rank trains, tensorboard's own
event files read back with its EventAccumulator, wandb in offline mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from vla_dist.checkpoint import manager as ckpt
from vla_dist.checkpoint.export import export_checkpoint
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError
from vla_dist.rollout.evaluate import wilson_interval
from vla_dist.train import run_train
from vla_dist.train.evals import eval_score
from vla_dist.train.metrics import read_metrics

STEPS, EVAL_EVERY = 5, 2  # evals at steps 2, 4 and 5 (the last step is always evaluated)


@pytest.fixture(scope="module")
def dataset(quickstart_run, local_ray: None) -> Path:
    """The session's quickstart dataset (8 episodes, 3 tasks): trained on at the model's 32 px, and the
    evals render at task.image_size=32 too, the cheapest closed-loop episodes."""
    return quickstart_run[1]


def eval_cfg(run_dir: Path, data_dir: Path, *overrides: str):
    return validate(load_config(None, [
        f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2", "task.name=all",
        "task.image_size=32", "task.max_steps=12", "collect.envs_per_actor=2", "data.num_workers=0",
        "train.world_size=1", "train.micro_batch_size=4", "train.lr=3e-3", f"train.steps={STEPS}",
        f"train.eval_every={EVAL_EVERY}", "train.eval_episodes=1", "train.eval_actors=1", "eval.num_videos=1",
        *overrides]))


@pytest.fixture(scope="module")
def eval_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = eval_cfg(run_dir, dataset, "train.zero_stage=3", "train.save_every=0", "train.keep_last=1",
                   "train.keep_best=true", "train.tensorboard=true", "train.wandb=true")
    report = run_train(cfg)
    return cfg, report, read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_eval_rows_at_their_steps_with_intervals(eval_run) -> None:
    cfg, report, rows = eval_run
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "success_rate" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all(isinstance(r["eval_running"], bool) for r in train_rows)
    assert sorted(r["step"] for r in evals) == [2, 4, 5]
    for row in evals:
        assert "loss" not in row and row["episodes"] == 3  # 1 per task
        low, high = wilson_interval(row["successes"], row["episodes"])
        assert row["ci95"] == [round(low, 4), round(high, 4)]
        assert row["success_rate"] == row["successes"] / 3
        assert sorted(row["per_task"]) == ["pick_cube", "push_cube", "stack_cube"]
        for task in row["per_task"].values():
            low, high = wilson_interval(task["successes"], 1)
            assert task["episodes"] == 1 and task["ci95"] == [round(low, 4), round(high, 4)]
            # how near the cube came to its success region, over the failed episodes (none: no figure);
            # every layout starts the cube 8 cm (pick) to 19 cm (stack) from it
            goal = task["failures_closest_goal_cm"]
            assert goal is None if task["successes"] == 1 else (goal["failures"] == 1 and 0 < goal["median"] < 30)
        assert row["export_s"] > 0 and row["eval_wall_s"] > 0 and row["closest_approach_cm"] > 0
        assert (Path(cfg.run.dir) / "evals" / f"step_{row['step']}" / "report.json").is_file()
        assert not (Path(cfg.run.dir) / "evals" / f"step_{row['step']}" / "weights").exists()  # consumed
        assert len(list((Path(cfg.run.dir) / "evals" / f"step_{row['step']}" / "videos").glob("*.mp4"))) == 1
    assert report["evals"] == 3 and report["eval_errors"] == []
    assert report["final_success_rate"] == max(evals, key=lambda r: r["step"])["success_rate"]
    assert report["eval_export_s_total"] == pytest.approx(sum(r["export_s"] for r in evals), abs=0.01)
    assert report["median_step_s_no_eval"] is not None or report["median_step_s_eval_running"] is not None
    with Image.open(report["loss_png"]) as png:  # two panels: loss, then success against the step
        assert png.size == (600, 600)


def test_tensorboard_holds_every_metric_and_eval_gifs(eval_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, rows = eval_run
    events = EventAccumulator(str(Path(cfg.run.dir) / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("loss", "lr", "grad_norm", "samples_per_s"):
        assert [e.step for e in events.Scalars(f"train/{name}")] == list(range(1, STEPS + 1)), name
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([loss[s] for s in range(1, STEPS + 1)])
    evals = {r["step"]: r for r in rows if "success_rate" in r}
    for tag in ("eval/success_rate", "eval/stack_cube/success_rate", "eval/success_ci95_high", "eval/episodes"):
        assert sorted(e.step for e in events.Scalars(tag)) == sorted(evals), tag
    for event in events.Scalars("eval/success_ci95_high"):
        assert event.value == pytest.approx(evals[event.step]["ci95"][1])
    gifs = [tag for tag in tags["images"] if tag.startswith("eval/video/")]
    assert gifs, tags["images"]
    image = events.Images(gifs[0])[0]
    assert image.encoded_image_string[:6] in (b"GIF87a", b"GIF89a") and image.height >= 64
    with Image.open(__import__("io").BytesIO(image.encoded_image_string)) as gif:
        assert gif.n_frames > 1  # a video, not a still


def test_wandb_offline_run_written(eval_run) -> None:
    cfg, _, _ = eval_run
    runs = list((Path(cfg.run.dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_keep_best_keeps_the_best_step_after_pruning(eval_run, tmp_path: Path) -> None:
    cfg, report, rows = eval_run
    run_dir = Path(cfg.run.dir)
    evals = sorted((r for r in rows if "success_rate" in r), key=lambda r: r["step"])
    best = max(evals, key=eval_score)  # first of equals wins: a later eval must be strictly better
    expected = next(r for r in evals if eval_score(r) == eval_score(best))["step"]
    assert ckpt.best_checkpoint(run_dir) == ckpt.step_dir(run_dir, expected)
    assert report["best_step"] == expected and report["best_success_rate"] == best["success_rate"]
    left = sorted(p.name for p in ckpt.checkpoints_dir(run_dir).glob("step_*"))
    assert left == sorted({f"step_{STEPS}", f"step_{expected}"})  # keep_last=1: latest + best, the rest pruned
    exported = export_checkpoint(run_dir / "checkpoints" / "best", tmp_path / "best")  # what eval.checkpoint uses
    assert exported["step"] == expected and (tmp_path / "best" / "vla_dist.json").is_file()


def test_prune_spares_best_and_pending(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        ckpt.step_dir(tmp_path, step).mkdir(parents=True)
        ckpt.mark_complete(ckpt.step_dir(tmp_path, step), step, {})
    ckpt.mark_best(ckpt.step_dir(tmp_path, 1))
    ckpt.prune(tmp_path, keep_last=1, keep=[ckpt.step_dir(tmp_path, 3)])
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).glob("step_*")) == ["step_1", "step_3", "step_4"]
    assert ckpt.best_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 1)
    ckpt.mark_best(ckpt.step_dir(tmp_path, 3))  # replaced atomically; the former best is prunable again
    ckpt.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).glob("step_*")) == ["step_3", "step_4"]
    assert ckpt.is_complete(ckpt.checkpoints_dir(tmp_path) / "best")  # `best` reads as a checkpoint dir


def test_eval_score_ranks_success_then_approach() -> None:
    rows = [{"success_rate": 0.0, "closest_approach_cm": 9.0}, {"success_rate": 0.0, "closest_approach_cm": 4.0},
            {"success_rate": 0.5, "closest_approach_cm": 20.0}, {"success_rate": 0.5, "closest_approach_cm": None}]
    assert max(rows, key=eval_score) is rows[2]
    assert eval_score(rows[1]) > eval_score(rows[0]) > eval_score({"success_rate": 0.0, "closest_approach_cm": None})


def test_eval_config_errors_name_their_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = [f"run.dir={tmp_path / 'run'}", "cluster.num_cpus=2"]
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, [*base, "train.keep_best=true"]))
    assert error.value.key == "train.keep_best"
    with pytest.raises(ConfigError) as error:  # 2 ranks + 1 eval actor on 2 CPUs: refused, not queued forever
        validate(load_config(None, [*base, "train.world_size=2", "train.eval_every=5"]))
    assert error.value.key == "train.eval_actors" and "train.eval_cpus_per_actor" in str(error.value)
    validate(load_config(None, [*base, "train.world_size=2", "train.eval_every=5", "train.cpus_per_rank=0.75",
                                     "train.eval_cpus_per_actor=0.5"]))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed: import fails
    with pytest.raises(ConfigError) as error:
        run_train(validate(load_config(None, [*base, "train.wandb=true"])))
    assert error.value.key == "train.wandb" and "vla-dist[wandb]" in str(error.value)
    assert not (tmp_path / "run").exists()  # before any work: not even config.yaml


@pytest.mark.heavy
def test_lora_eval_runs_the_merged_adapter(dataset: Path, tmp_path: Path) -> None:
    """LoRA: the ranks write only the adapter; the eval side merges it into the rebuilt base. The
    policy the eval actors ran predicts what a --merge-lora export of the same step predicts."""
    import torch

    from vla_dist.models.build import load_policy
    from vla_dist.train.batches import EpisodeWindows

    run_dir = tmp_path / "lora"
    cfg = eval_cfg(run_dir, dataset, "train.steps=2", "train.eval_every=2", "train.save_every=2",
                   "train.zero_stage=2", "train.lora.enabled=true", "train.lora.r=4", "train.eval_episodes=1")
    report = run_train(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "success_rate" in r]
    assert [r["step"] for r in rows] == [2] and rows[0]["episodes"] == 3 and report["eval_errors"] == []
    ran = load_policy(run_dir / "evals" / "current_policy").eval()  # plain policy: merged, no adapter/ left
    export_checkpoint(ckpt.step_dir(run_dir, 2), tmp_path / "merged", merge_lora=True)
    merged = load_policy(tmp_path / "merged").eval()
    windows = EpisodeWindows(dataset, merged.cameras, merged.chunk_size, rank=0, world_size=1)
    batch = windows.batch(2, (5,))
    noise = torch.randn(2, merged.chunk_size, merged.action_dim, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ran.predict_chunk(batch, noise=noise), merged.predict_chunk(batch, noise=noise),
                               rtol=1e-5, atol=1e-5)


def test_tensorboard_resume_hides_what_the_crashed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vla_dist.train.loggers import TensorBoardLog

    first = TensorBoardLog(tmp_path, resumed_step=0)
    first.scalars({"train/loss": 1.0}, 1)
    first.scalars({"train/loss": 2.0}, 2)
    first.scalars({"train/loss": 3.0}, 3)  # after the checkpoint at step 2: redone by the resumed run
    first.close()
    resumed = TensorBoardLog(tmp_path, resumed_step=2)
    resumed.scalars({"train/loss": 30.0}, 3)
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
