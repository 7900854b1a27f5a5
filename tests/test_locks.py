"""Two processes writing one run: a stage another process is running is waited for and then kept, the
comparison record of two plans started at once keeps both plans' recipes, and a killed holder leaves no
lock behind. The other process is a real one (a Python child holding `vla_dist.locks.holding`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_dist.config import load_config, validate
from vla_dist.locks import holding
from vla_dist.recipes.run import ordered, recipe_file, record_comparison
from vla_dist.stages import run_stage

HOLDER = """
import sys, time
from pathlib import Path
from vla_dist.locks import holding
path, ready, hold_s, write, text = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
with holding([path]):
    ready.write_text("held")
    time.sleep(hold_s)
    if write:
        Path(write).parent.mkdir(parents=True, exist_ok=True)
        Path(write).write_text(text)
"""


def _hold(path: Path, tmp_path: Path, hold_s: float, write: Path | None = None, text: str = "") -> subprocess.Popen:
    """A child process holding the lock on `path` for `hold_s` s, writing `text` to `write` before it lets go."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ready), str(hold_s), str(write or ""),
                              text], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, "the holder exited before taking the lock"
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return child


def test_a_stage_another_process_is_running_is_waited_for_then_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "base-pick" / "seed_0" / "eval-default"
    cfg = validate(load_config(recipe_file("base-pick"), [f"run.dir={run_dir}"]))
    finished = {"command": "eval", "wall_seconds": 12.5, "per_task": {"pick_cube": {"successes": 3, "episodes": 4}}}
    child = _hold(run_dir, tmp_path, 1.5, run_dir / "report.json", json.dumps(finished))
    logged: list[str] = []

    def would_run() -> None:
        raise AssertionError("the stage ran while another process was writing it")

    started = time.monotonic()
    report, kept_seconds = run_stage("eval", cfg, logged.append, before_run=would_run)
    assert child.wait(timeout=60) == 0
    assert report == finished and kept_seconds == 12.5
    assert time.monotonic() - started >= 1.0
    assert any("another process is writing" in line and str(run_dir) in line for line in logged)


def test_two_plans_recording_one_comparison_at_once_keep_both(tmp_path: Path) -> None:
    """The other plan holds the record while it rewrites it: this one waits and extends what it wrote,
    instead of both reading the old record and the later writer dropping the earlier one's recipes."""
    theirs = {"baseline": "base-pick", "seeds": [5], "evals": ["default"], "overrides": [],
              "recipes": {"select-seed": {"file": "configs/recipe/select-seed.yaml", "command": "train",
                                          "start_from": None, "control": None}}}
    child = _hold(tmp_path / "comparison.json", tmp_path, 1.0, tmp_path / "comparison.json", json.dumps(theirs))
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[0]"]
    base = validate(load_config(recipe_file("base-pick"), overrides))
    record_comparison(tmp_path, base, {name: (name, cfg) for name, cfg in
                                       ordered(["rl-ppo"], "base-pick", overrides).items()}, overrides)
    assert child.wait(timeout=60) == 0
    record = json.loads((tmp_path / "comparison.json").read_text())
    assert set(record["recipes"]) == {"select-seed", "base-pick", "rl-ppo"}
    assert record["seeds"] == [0, 5]


@pytest.mark.parametrize("ends", ["killed", "finished"])
def test_a_lock_is_free_once_its_holder_is_gone(tmp_path: Path, ends: str) -> None:
    """flock belongs to the holder's open file: a SIGKILLed holder leaves no stale lock to delete by hand."""
    child = _hold(tmp_path / "run", tmp_path, 0.5 if ends == "finished" else 600.0)
    if ends == "killed":
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    waited: list[Path] = []
    started = time.monotonic()
    with holding([tmp_path / "run"], on_wait=waited.append):
        assert waited == [] and time.monotonic() - started < 1.0


def test_holding_a_lock_held_elsewhere_reports_the_wait_once(tmp_path: Path) -> None:
    child = _hold(tmp_path / "run", tmp_path, 1.0)
    waited: list[Path] = []
    started = time.monotonic()
    with holding([tmp_path / "run", tmp_path / "data"], on_wait=waited.append):
        assert time.monotonic() - started >= 0.5  # got it only once the holder let go
    assert child.wait(timeout=60) == 0
    assert waited == [(tmp_path / "run").absolute()]
