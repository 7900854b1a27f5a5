"""Self-imitation (`collect.labels=own`, `dagger.labels=own`): a saved policy's rollouts keep its own
executed actions, successes only. What each kind of collection counts toward its target and writes
(the accounting every committed episode goes through), the config errors before any work, and (heavy,
in CI) a real collection whose untrained policy never succeeds: a clear error and no dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.rollout.collect import CollectionState

from .conftest import REPO_ROOT
from .test_dagger import Quickstart, _saved_untrained_policy

OUTCOMES = [True, False, False, True, True, False, True]  # committed in index order


def _admitted(state: CollectionState) -> list[str | None]:
    return [state.admit("pick_cube", success) for success in OUTCOMES]


def test_demonstrations_count_successes_only() -> None:
    state = CollectionState(target=3, keep_failures=True)
    assert _admitted(state) == ["counted", "failure", "failure", "counted", "counted", "failure", None]
    assert (state.counted, state.written, state.failures_written) == (3, 3, 3)  # the 4th success is surplus
    assert state.attempts["pick_cube"] == 7 and state.successes["pick_cube"] == 4


def test_expert_labels_write_every_rollout() -> None:
    state = CollectionState(target=5, keep_failures=False, count_every=True, write_every=True)
    assert _admitted(state) == ["counted"] * 5 + [None, None]
    assert (state.counted, state.written) == (5, 5)


def test_own_labels_count_every_rollout_and_write_its_successes() -> None:
    state = CollectionState(target=5, keep_failures=True, count_every=True)
    # the same 5 rollouts as DAgger's budget; only the 3 successes among them are written, failures never
    assert _admitted(state) == ["counted", None, None, "counted", "counted", None, None]
    assert (state.counted, state.written, state.failures_written) == (5, 3, 0)
    assert state.written_tasks["pick_cube"] == 3 and state.needed() == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["collect", "collect.labels=own"], "collect.labels"),  # own actions of no policy
    (["collect", "collect.labels=teacher"], "collect.labels"),
    (["dagger", "dagger.labels=teacher"], "dagger.labels"),
])
def test_bad_labels_exit_2_before_any_work(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.heavy
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_own_labels_of_a_policy_that_never_succeeds_write_no_dataset(quickstart_run: Quickstart,
                                                                       tmp_path: Path) -> None:
    _, data_dir, _ = quickstart_run
    start = _saved_untrained_policy(data_dir, tmp_path / "start")
    out = tmp_path / "own"
    tiny = [f"run.dir={tmp_path / 'run'}", f"data.dir={out}", f"collect.relabel_policy={start}", "collect.labels=own",
            "collect.episodes=2", "task.name=pick_cube", "task.max_steps=8", "cluster.num_cpus=2",
            "collect.num_actors=1", "collect.envs_per_actor=2", "collect.num_videos=0", "eval.temporal_ensemble=0"]
    proc = subprocess.run([sys.executable, "-m", "vla_dist", "collect", *tiny], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=800, check=False)
    assert proc.returncode != 0
    assert "none of the 2 rollouts" in proc.stderr and "nothing to imitate" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "manifest.json").exists()  # no dataset that a round would aggregate
