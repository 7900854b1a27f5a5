"""Real training batches (train.fixed_batches=false): WindowLoader splits on 2 real DeepSpeed gloo
ranks in Ray actors, epochs rolling over, the ranks agreeing on the step count, the loader position
saved in the checkpoint (train_state.json) and restored on resume; `bench train` and `bench checkpoint`
through the CLI. No mocks (the step-count agreement is also checked with threads as ranks, where
uneven splits are easy to make)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from vla_dist.checkpoint import manager as ckpt
from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.train import run_train
from vla_dist.train.batches import LoaderBatches, batch_digest
from vla_dist.train.metrics import read_metrics

# Several 2-rank DeepSpeed runs on real windows plus the train/checkpoint benches: minutes, marked heavy
# (run after the main suite); the threads-as-ranks test needs only the quickstart dataset: main suite.
heavy = pytest.mark.heavy

STEPS, SAVE = 10, 5
MICRO = 8
# stride 4: ~9 windows per quickstart episode, ~36 per rank, ~4 batches of 8 per epoch: 10 steps
# cross two epoch ends; images shifted (data.random_shift): resume must reproduce the shifts too
DATA = ["data.window_stride=4", "data.shuffle_buffer=16", "data.num_workers=1", "data.random_shift=2"]


def data_cfg(run_dir: Path, data_dir: Path, *overrides: str):
    return validate(load_config(None, [f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2",
                                       "train.world_size=2", f"train.micro_batch_size={MICRO}", "train.lr=1e-3",
                                       "train.fixed_batches=false", *DATA, *overrides]))


@pytest.fixture(scope="module")
def loader_run(quickstart_run, local_ray, tmp_path_factory):
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path_factory.mktemp("train_data") / "run"
    cfg = data_cfg(run_dir, data_dir, f"train.steps={STEPS}", f"train.save_every={SAVE}")
    report = run_train(cfg)
    return cfg, report, read_metrics(run_dir / "metrics.jsonl")


@heavy
def test_two_ranks_train_on_real_windows_over_epochs(loader_run):
    cfg, report, rows = loader_run
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert torch.isfinite(torch.tensor(row["loss"])), row
        assert row["rank_windows"] == [MICRO, MICRO], row  # every step: a full batch on every rank
    epochs = [row["data_epoch"] for row in rows]
    assert epochs == sorted(epochs) and epochs[-1] >= 2, epochs  # epochs rolled over (twice at least)
    assert len({row["batch_digest"] for row in rows}) == STEPS  # real, changing batches
    assert report["final_loss"] == rows[-1]["loss"]
    assert ckpt.is_complete(ckpt.step_dir(cfg.run.dir, SAVE)) and ckpt.is_complete(ckpt.step_dir(cfg.run.dir, STEPS))


@heavy
def test_loader_state_is_in_the_checkpoint_and_resume_continues_the_data(loader_run, tmp_path):
    cfg, _, rows = loader_run
    train_state = json.loads((ckpt.step_dir(cfg.run.dir, SAVE) / ckpt.TRAIN_STATE).read_text())
    states = train_state["data_loader"]
    assert train_state["global_steps"] == SAVE
    assert [s["rank"] for s in states] == [0, 1] and all(s["world_size"] == 2 for s in states)
    saved = rows[SAVE - 1]  # the metrics row of the step the checkpoint was taken after
    assert (states[0]["epoch"], states[0]["windows_delivered_total"]) == (saved["data_epoch"], saved["data_position"])

    run_dir = tmp_path / "crashed"  # as if the run died after step SAVE's checkpoint
    shutil.copytree(cfg.run.dir, run_dir)
    (ckpt.step_dir(run_dir, STEPS) / ckpt.COMPLETE).unlink()
    report = run_train(data_cfg(run_dir, Path(cfg.data.dir), f"train.steps={STEPS}", f"train.save_every={SAVE}"))
    assert report["first_step"] == SAVE
    again = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in again] == list(range(1, STEPS + 1))
    for before, after in zip(rows[SAVE:], again[SAVE:], strict=True):
        # the first batch after resume (and every later one) is the one the uninterrupted run took
        assert after["batch_digest"] == before["batch_digest"], (before, after)
        assert (after["data_epoch"], after["data_position"]) == (before["data_epoch"], before["data_position"])
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4, abs=1e-5), (before, after)


def test_closing_a_ranks_batches_stops_its_dataloader_workers_and_keeps_its_position(quickstart_run):
    """What a trainer rank does before its group kills it (TrainerGroup.shutdown -> release): the
    DataLoader workers of the epoch in progress exit now (else they get the kill's SIGTERM first and
    torch prints "DataLoader worker ... killed by signal" after a finished run), and a batch taken after
    closing is the one the run would have taken next."""
    import multiprocessing

    _, data_dir, _ = quickstart_run
    cfg = validate(load_config(None, [f"data.dir={data_dir}", "data.window_stride=2", "data.num_workers=1"]))

    def alone(value: float) -> float:
        return value

    before = set(multiprocessing.active_children())
    closed = LoaderBatches(cfg, 0, 1, 4, alone)
    taken = [batch_digest([closed.next()]) for _ in range(3)]
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1  # alive mid-epoch
    closed.close()
    for worker in workers:
        worker.join(timeout=30)
    assert not any(worker.is_alive() for worker in workers)
    after_close = batch_digest([closed.next()])
    closed.close()
    uninterrupted = LoaderBatches(cfg, 0, 1, 4, alone)
    assert [batch_digest([uninterrupted.next()]) for _ in range(4)] == [*taken, after_close]
    uninterrupted.close()


def test_ranks_with_uneven_splits_take_the_same_number_of_batches(quickstart_run):
    """3 'ranks' (threads) over 8 episodes: blocks of 3, 3, 2 episodes, so uneven batch counts; the
    MIN agreement makes every rank stop each epoch together, and a saved position resumes exactly."""
    _, data_dir, _ = quickstart_run
    cfg = validate(load_config(None, [f"data.dir={data_dir}", "data.window_stride=2", "data.num_workers=0"]))
    world = 3
    barrier, votes = threading.Barrier(world), [0.0] * world

    def agree_for(rank: int):
        def agree(value: float) -> float:
            votes[rank] = value
            barrier.wait()
            low = min(votes)
            barrier.wait()
            return low
        return agree

    ranks = [LoaderBatches(cfg, r, world, 4, agree_for(r)) for r in range(world)]
    taken: list[list[tuple[int, str]]] = [[] for _ in range(world)]
    states: list[dict] = [{} for _ in range(world)]

    def run(rank: int) -> None:
        for step in range(40):
            batch = ranks[rank].next()
            assert batch.actions.shape[0] == 4
            taken[rank].append((ranks[rank].epoch, batch_digest([batch])))
            if step == 24:
                states[rank] = ranks[rank].state_dict()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(len(t) == 40 for t in taken), [len(t) for t in taken]
    for rank in range(1, world):  # same epoch at every step on every rank
        assert [e for e, _ in taken[rank]] == [e for e, _ in taken[0]]
    assert taken[0][-1][0] >= 2  # rolled over
    # resume: a fresh rank set loaded from the step-24 states yields the batches 25.. the run took
    resumed = [LoaderBatches(cfg, r, world, 4, agree_for(r)) for r in range(world)]
    again: list[list[str]] = [[] for _ in range(world)]

    def rerun(rank: int) -> None:
        resumed[rank].load_state_dict(states[rank])
        for _ in range(40 - 25):
            again[rank].append(batch_digest([resumed[rank].next()]))

    threads = [threading.Thread(target=rerun, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for rank in range(world):
        assert again[rank] == [d for _, d in taken[rank][25:]]


def _bench_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@heavy
def test_bench_train_prints_json(quickstart_run, local_ray, tmp_path, capsys):
    _, data_dir, _ = quickstart_run
    assert main(["bench", "train", f"data.dir={data_dir}", f"run.dir={tmp_path}", "cluster.num_cpus=2",
                 "train.world_size=2", "train.micro_batch_size=4", "train.steps=4"]) == 0
    report = _bench_json(capsys)
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "train" and report["unit"] == "samples/s"
    assert report["value"] > 0 and report["baseline"] > 0
    assert report["ratio"] == pytest.approx(report["value"] / report["baseline"], rel=1e-2)
    assert report["world_size"] == 2 and report["zero_stage"] == 2 and report["global_batch_size"] == 8
    assert report["model_flops_per_sample"] > 0
    # where the time goes: the ranks' phases (median ms), the plain step's, the ceiling, the transport
    phases = report["breakdown_ms"]
    assert {"data", "forward", "nan_check", "backward", "backward_compute", "gradient_reduction", "step",
            "other"} <= phases.keys(), phases
    assert sum(phases[k] for k in ("data", "forward", "nan_check", "backward", "step", "other")) == pytest.approx(
        report["median_step_s"] * 1e3, rel=0.5)  # medians of parts: near the median step, not equal
    assert set(report["baseline_breakdown_ms"]) == {"forward", "backward", "step"}
    assert report["share_step_s"] > 0 and report["ceiling_ratio"] > 0
    assert report["collectives_ms"]["bytes"] == 4 * report["trainable_parameters"]
    assert all(report["collectives_ms"][k] > 0 for k in ("all_reduce", "reduce_scatter", "all_gather"))


@heavy
def test_bench_checkpoint_prints_json(quickstart_run, local_ray, tmp_path, capsys):
    _, data_dir, _ = quickstart_run
    assert main(["bench", "checkpoint", f"data.dir={data_dir}", f"run.dir={tmp_path}", "cluster.num_cpus=2",
                 "train.world_size=2", "train.micro_batch_size=4"]) == 0
    report = _bench_json(capsys)
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "checkpoint" and report["unit"] == "GB/s"
    assert report["value"] > 0 and report["baseline"] > 0 and report["bytes"] > 1_000_000
    assert report["ratio"] == pytest.approx(report["value"] / report["baseline"], rel=1e-2)
