"""`vla-dist train` stops on SIGUSR1 (SLURM's time-limit signal) and SIGTERM (Kubernetes, docker stop)
with a complete checkpoint at the step it reached, and `train.resume=auto` continues from there.

Real DeepSpeed on 2 gloo ranks in Ray actors, tiny-pi0 on the quickstart dataset; the SIGUSR1 run is
`vla-dist train` in its own process (its own in-process Ray), signalled as the SLURM script does."""

from __future__ import annotations

import json
import os
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
from vla_dist.train.stop import StoppedBySignal, StopRequest

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
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: reported, not acted on
        time.sleep(0.1)  # Python runs the handlers between bytecodes of the main thread
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


def test_sigusr1_saves_and_stops_then_resume_auto_continues(quickstart_run, local_ray, tmp_path) -> None:
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "run"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vla_dist", "train", *overrides(run_dir, data_dir, STEPS)],
                                cwd=REPO_ROOT, stdout=stdout, stderr=stderr, text=True)
    try:
        wait_until_stepping(run_dir, lambda: proc.poll() is None, timeout_s=300)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGUSR1)  # what the sbatch script does when the time limit nears
        proc.send_signal(signal.SIGTERM)  # a second signal while it stops must not abort the save
        proc.wait(timeout=120)
        stop_s = time.monotonic() - signalled
    finally:
        kill_tree(proc)
    log = out.read_text() + err.read_text()
    assert proc.returncode == 0, log[-3000:]  # documented: a stop on SIGUSR1 is not a failure

    report = json.loads((run_dir / "report.json").read_text())
    stop = report["last_step"]
    assert report["stopped_by"] == "SIGUSR1" and 1 <= stop < STEPS, report
    kept = ckpt.step_dir(run_dir, stop)
    assert ckpt.is_complete(kept) and ckpt.latest_checkpoint(run_dir) == kept
    assert (ckpt.checkpoints_dir(run_dir) / ckpt.LATEST).read_text().strip() == kept.name
    assert report["checkpoint"] == str(kept)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, stop + 1))
    assert f"stopped by SIGUSR1 at step {stop} of {STEPS}; checkpoint kept: {kept}" in log, log[-3000:]
    assert "SIGTERM ignored" in log
    assert "train stopped by SIGUSR1: " in log and "train done" not in log  # the CLI's summary line says so
    print(f"SIGUSR1 -> stopped at step {stop}, saved and exited in {stop_s:.1f} s")
    assert stop_s < 90  # one step, a save of a tiny model, Ray's shutdown: seconds, not the 200 steps

    resumed = run_train(validate(load_config(None, [*overrides(run_dir, data_dir, stop + 2), "train.resume=auto"])))
    assert resumed["first_step"] == stop and resumed["resumed_from"] == str(kept)
    assert resumed["stopped_by"] is None and resumed["last_step"] == stop + 2
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, stop + 2)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, stop + 3))


def test_sigterm_saves_and_raises_so_the_cli_exits_1(quickstart_run, local_ray, tmp_path) -> None:
    """SIGTERM (in this process, as Kubernetes or docker stop would send it): the same save, but the
    run ends with StoppedBySignal (a VlaDistError: exit 1), so a supervisor does not count it as done."""
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "run"
    cfg = validate(load_config(None, overrides(run_dir, data_dir, STEPS)))
    finished = threading.Event()

    def terminate_once_stepping() -> None:
        wait_until_stepping(run_dir, lambda: not finished.is_set(), timeout_s=300)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, inside run_train

    sender = threading.Thread(target=terminate_once_stepping, daemon=True)
    sender.start()
    try:
        stopped_message = r"stopped by SIGTERM at step \d+ of 200; checkpoint kept: "
        with pytest.raises(StoppedBySignal, match=stopped_message) as stopped:
            run_train(cfg)
    finally:
        finished.set()
        sender.join(timeout=10)
    report = stopped.value.report
    assert report == json.loads((run_dir / "report.json").read_text())
    assert report["stopped_by"] == "SIGTERM" and report["last_step"] < STEPS
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, report["last_step"])
    assert ckpt.is_complete(ckpt.step_dir(run_dir, report["last_step"]))
