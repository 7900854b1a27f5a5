"""Crash safety of training checkpoints, for real: `kill -9` of a trainer rank while it is inside its
save of checkpoint N leaves checkpoint N-1 loadable and `latest` pointing to it; `train.resume=auto`
then continues the run exactly as if it had never been interrupted.

The killed training is `vla-dist train` in its own process (its own in-process Ray, so the SIGKILL
hits a real Ray actor process of an SFTWorker and nothing of the test session). The kill is not a
race against a sub-second save: the process runs the CLI through tests/faults.py with a worker
subclass (hold_save_worker) that holds rank 1 inside its save of step_N right after DeepSpeed wrote
its shards (rank 0 waits in the save's barrier) and makes it write its pid; the test kills exactly
that process then. Real DeepSpeed on gloo ranks, tiny-pi0 on the quickstart dataset; no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vla_dist.checkpoint import manager as ckpt
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.train import run_train
from vla_dist.train.metrics import read_metrics

from .conftest import REPO_ROOT

# Three DeepSpeed runs (killed, resumed, uninterrupted): about a minute; run after the main suite.
pytestmark = pytest.mark.heavy

STEPS, SAVE = 6, 2
KILLED_SAVE = 4  # rank 1 dies inside the save of step_4, after step_2's checkpoint completed
KEPT = KILLED_SAVE - SAVE
KILLED_RANK = 1
# as tests/test_train_resume.py: a same-size resume repeats the uninterrupted run's arithmetic
REL, ABS = 1e-4, 1e-6


def overrides(run_dir: Path, data_dir: Path) -> list[str]:
    # fixed_batches: every step's batch and noise are a function of the config only, so the resumed
    # run's losses are comparable step by step with an uninterrupted run's
    return [f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2", "train.world_size=2",
            "train.micro_batch_size=4", "train.lr=3e-3", "train.fixed_batches=true", f"train.steps={STEPS}",
            f"train.save_every={SAVE}", "train.zero_stage=2", "train.resume=auto"]


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before its save of step_{KILLED_SAVE} held: "
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"no {path.name} within {timeout_s:.0f} s")
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen) -> None:
    """On a failed assertion: the training we started and its own Ray (raylet, held ranks), by pid."""
    if proc.poll() is not None:
        return
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_continues(quickstart_run, local_ray, tmp_path):
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "killed"
    killed_dir, kept_dir = ckpt.step_dir(run_dir, KILLED_SAVE), ckpt.step_dir(run_dir, KEPT)
    log = tmp_path / "killed.log"  # a file, not a pipe nobody reads while training: it could fill and block
    with open(log, "w", encoding="utf-8") as out:
        # `vla-dist train`, its rank KILLED_RANK held in the save of step_KILLED_SAVE for up to 600 s
        proc = subprocess.Popen([sys.executable, "-m", "tests.faults", "hold-save", f"{KILLED_SAVE}:{KILLED_RANK}:600",
                                 "train", *overrides(run_dir, data_dir)],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        held = killed_dir / f".hold_save_rank{KILLED_RANK}.pid"
        wait_for(held, proc, log, timeout_s=600)
        victim = psutil.Process(int(held.read_text()))
        # the trainer rank's own Ray actor process, in its save, under this run's Ray (driver = proc)
        assert victim.name().startswith("ray::SFTWorker"), victim.cmdline()
        assert proc.pid in {parent.pid for parent in victim.parents()}
        # mid-save: step_4's DeepSpeed shards are on disk, step_2 is the complete one
        assert any(killed_dir.glob("*optim_states.pt")) and not ckpt.is_complete(killed_dir)
        assert ckpt.latest_checkpoint(run_dir) == kept_dir
        os.kill(victim.pid, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    err = log.read_text(encoding="utf-8")

    assert proc.returncode == 1, err[-3000:]
    assert f"trainer rank {KILLED_RANK} " in err and f"checkpoint kept: {kept_dir}" in err, err[-3000:]
    assert "train.resume=auto" in err
    # the previous checkpoint is whole and `latest` names it; the killed save is not complete
    assert (ckpt.checkpoints_dir(run_dir) / ckpt.LATEST).read_text().strip() == kept_dir.name
    assert ckpt.is_complete(kept_dir) and ckpt.latest_checkpoint(run_dir) == kept_dir
    assert killed_dir.is_dir() and not ckpt.is_complete(killed_dir)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, KILLED_SAVE + 1))

    # train.resume=auto picks step_2 (never the half-saved step_4), re-saves step_4 whole and finishes
    report = run_train(validate(load_config(None, overrides(run_dir, data_dir))))
    assert report["first_step"] == KEPT and report["resumed_from"] == str(kept_dir)
    assert report["checkpoint"] == str(ckpt.step_dir(run_dir, STEPS))
    assert ckpt.is_complete(killed_dir) and not any(killed_dir.glob(".hold_save_*"))  # saved anew, not patched
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))  # each step once

    straight_dir = tmp_path / "uninterrupted"
    run_train(validate(load_config(None, overrides(straight_dir, data_dir))))
    straight = read_metrics(straight_dir / "metrics.jsonl")
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(straight, resumed, strict=True)]
    print(f"kill -9 in save of step_{KILLED_SAVE}, resumed from step_{KEPT}: max |loss delta| vs the "
          f"uninterrupted run = {max(deltas):.3g}; per step {[f'{d:.2g}' for d in deltas]}")
    for before, after in zip(straight, resumed, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=REL, abs=ABS), (before, after)
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-9), (before, after)
