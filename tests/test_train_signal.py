"""`vla-dist train` stops on SIGUSR1 (SLURM's time-limit signal) and SIGTERM (Kubernetes, docker stop)
with a complete checkpoint at the step it reached, and `train.resume=auto` continues from there.

Real DeepSpeed on 2 gloo ranks in Ray actors, tiny-pi0 on the quickstart dataset. Each stopped run is
`vla-dist train` in its own process (its own in-process Ray), signalled as the SLURM script or a
supervisor does; the test process itself is never signalled (the StopRequest unit test aside, which
signals itself with its handlers installed). No timing is asserted: the tests wait for the run's own
files (its first metrics row, its exit) with generous timeouts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from vla_dist.checkpoint import manager as ckpt
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.train import run_train
from vla_dist.train.metrics import read_metrics
from vla_dist.train.stop import StopRequest

from .conftest import REPO_ROOT

STEPS, SAVE_EVERY = 200, 100  # far more than the test lets run: the stop comes from the signal


def overrides(run_dir: Path, data_dir: Path, steps: int) -> list[str]:
    return [f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2", "train.world_size=2",
            "train.micro_batch_size=4", f"train.steps={steps}", f"train.save_every={SAVE_EVERY}"]


def steps_logged(run_dir: Path) -> int:
    """Whole lines of metrics.jsonl (a line being appended is not counted, nor parsed half-written)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.is_file() else 0


def wait_until_stepping(run_dir: Path, alive, timeout_s: float) -> None:
    """Until metrics.jsonl has a row: the ranks are set up and stepping, the stop handler installed."""
    deadline = time.monotonic() + timeout_s
    while steps_logged(run_dir) < 1:
        assert alive(), "training ended before its first step"
        assert time.monotonic() < deadline, f"no training step within {timeout_s:.0f} s"
        time.sleep(0.1)


def kill_tree(proc: subprocess.Popen) -> None:
    """On a failed assertion: the training we started and its own Ray, by pid."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_stop_request_records_the_first_signal_and_restores_handlers(capfd) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with StopRequest() as stop:
        assert not stop.requested
        # raise_signal delivers to this (the main) thread and runs the Python handler before it returns
        signal.raise_signal(signal.SIGUSR1)
        assert stop.signal_name == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)  # a second signal while stopping: reported, not acted on
        assert stop.signal_name == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before
    err = capfd.readouterr().err
    assert "SIGUSR1 received: saving a checkpoint" in err and "SIGTERM ignored: already stopping (SIGUSR1)" in err

    def in_a_thread() -> None:  # Python allows handlers only in the main thread: inert there, no error
        with StopRequest() as inert:
            assert not inert.requested

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def train_and_signal(run_dir: Path, data_dir: Path, tmp_path: Path,
                     *signals: signal.Signals) -> tuple[subprocess.Popen, str]:
    """`vla-dist train` (200 steps) in its own process; once it steps, `signals` in order; then its
    exit (a generous bound: a stop is one chunk of steps, a save and Ray's shutdown). -> (the
    finished process, its stdout + stderr)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vla_dist", "train", *overrides(run_dir, data_dir, STEPS)],
                                cwd=REPO_ROOT, stdout=stdout, stderr=stderr, text=True)
    try:
        wait_until_stepping(run_dir, lambda: proc.poll() is None, timeout_s=600)
        for sig in signals:
            proc.send_signal(sig)
        proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    return proc, out.read_text() + err.read_text()


def check_kept_and_resume(run_dir: Path, data_dir: Path, report: dict, signal_name: str) -> None:
    """The run stopped early by `signal_name` with a complete checkpoint at its last step, `latest`
    pointing to it, one metrics row per step; `train.resume=auto` continues from exactly there."""
    stop = report["last_step"]
    assert report["stopped_by"] == signal_name and 1 <= stop < STEPS, report
    kept = ckpt.step_dir(run_dir, stop)
    assert ckpt.is_complete(kept) and ckpt.latest_checkpoint(run_dir) == kept
    assert (ckpt.checkpoints_dir(run_dir) / ckpt.LATEST).read_text().strip() == kept.name
    assert report["checkpoint"] == str(kept)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, stop + 1))

    resumed = run_train(validate(load_config(None, [*overrides(run_dir, data_dir, stop + 2), "train.resume=auto"])))
    assert resumed["first_step"] == stop and resumed["resumed_from"] == str(kept)
    assert resumed["stopped_by"] is None and resumed["last_step"] == stop + 2
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, stop + 2)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, stop + 3))


@pytest.mark.heavy  # a training run stopped by the signal and resumed: ~50 s, like SIGTERM's below
@pytest.mark.timeout(1800)  # the run's own waits (600 s each) report first
def test_sigusr1_saves_and_stops_then_resume_auto_continues(quickstart_run, local_ray, tmp_path) -> None:
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "run"
    # SIGUSR1: what the sbatch script sends when the time limit nears; then a SIGTERM while the
    # driver stops, which must not abort the save
    proc, log = train_and_signal(run_dir, data_dir, tmp_path, signal.SIGUSR1, signal.SIGTERM)
    assert proc.returncode == 0, log[-3000:]  # documented: a stop on SIGUSR1 is not a failure

    report = json.loads((run_dir / "report.json").read_text())
    stop, kept = report["last_step"], ckpt.step_dir(run_dir, report["last_step"])
    assert f"stopped by SIGUSR1 at step {stop} of {STEPS}; checkpoint kept: {kept}" in log, log[-3000:]
    assert "SIGTERM ignored" in log
    assert "train stopped by SIGUSR1: " in log and "train done" not in log  # the CLI's summary line says so
    check_kept_and_resume(run_dir, data_dir, report, "SIGUSR1")


@pytest.mark.heavy  # ~50 s; CI's SLURM requeue test (marked ci) signals a training run the same way
@pytest.mark.timeout(1800)  # the run's own waits (600 s each) report first
def test_sigterm_saves_and_exits_1_then_resume_auto_continues(quickstart_run, local_ray, tmp_path) -> None:
    """SIGTERM (as Kubernetes, docker stop or ray job stop send it) to `vla-dist train`: the same save,
    but exit code 1 with `error: stopped by SIGTERM ...` (docs/multinode.md, "Stopping a training
    run"), so a supervisor does not count the run as done; the checkpoint resumes."""
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "run"
    proc, log = train_and_signal(run_dir, data_dir, tmp_path, signal.SIGTERM)
    assert proc.returncode == 1, log[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    stop, kept = report["last_step"], ckpt.step_dir(run_dir, report["last_step"])
    assert (f"error: stopped by SIGTERM at step {stop} of {STEPS}; checkpoint kept: {kept}; "
            "restart with train.resume=auto") in log, log[-3000:]
    assert "vla-dist train: SIGTERM received: saving a checkpoint" in log
    assert "hint: rerun with --debug" not in log and "train done" not in log  # a VlaDistError, not a crash
    check_kept_and_resume(run_dir, data_dir, report, "SIGTERM")
