"""`vla-dist quickstart`: collect -> eval -> train (full, LoRA) -> eval, end to end on the real stack
(Genesis actors, DeepSpeed ranks over gloo in the session's Ray), at a test-sized budget."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.quickstart import plan

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]


# Seven stages (four evals, two DeepSpeed runs): about 5 minutes on 2 quiet cores; run after the main suite.
heavy = pytest.mark.heavy


@pytest.fixture(scope="module")
def quickstart_loop(quickstart_run: Quickstart, local_ray: None, tmp_path_factory: pytest.TempPathFactory):
    _, data_dir, _ = quickstart_run
    root = tmp_path_factory.mktemp("quickstart") / "qs"
    # The session's 8-episode dataset is reused (collect.episodes=8), one task keeps evals short.
    overrides = [f"run.dir={root}", f"data.dir={data_dir}", "collect.episodes=8", "task.name=pick_cube",
                 "eval.episodes=2", "eval.num_videos=1", "train.steps=6", "train.save_every=3", "train.log_every=3"]
    assert main(["quickstart", *overrides]) == 0
    return root, overrides


@heavy
def test_quickstart_compares_the_policies_before_and_after_training(quickstart_loop) -> None:
    root, _ = quickstart_loop
    summary = json.loads((root / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["policies"]}
    assert list(rows) == ["expert", "untrained", "full", "lora"]
    assert summary["dataset_episodes"] == 8  # from the manifest, whether collect wrote or reused the dataset
    assert rows["expert"]["successes"] >= 1  # the expert picks the cube (100/100 seeds measured)
    for row in rows.values():
        assert row["episodes"] == 2 and 0.0 <= row["success_rate"] <= 1.0
        assert row["closest_approach_cm"] is not None and row["closest_approach_cm"] > 0
    # The expert's gripper reaches the cube: its grasp point closes to within a few centimetres.
    assert rows["expert"]["closest_approach_cm"] < 3.0
    for name in ("full", "lora"):
        training = summary["training"][name]
        # 6 steps prove the loop, not learning (tests/test_train.py checks the loss falls)
        assert training["steps"] == 6 and 0 < training["final_loss"] < 10 and 0 < training["first_loss"] < 10
        eval_report = json.loads((root / f"eval-{name}" / "report.json").read_text())
        assert eval_report["checkpoint"] == str(root / f"eval-{name}" / "policy")  # exported from the run
    lora, full = summary["training"]["lora"], summary["training"]["full"]
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert (root / "summary.png").stat().st_size > 0 and "| LoRA |" in (root / "summary.md").read_text()
    assert (root / "train-full" / "checkpoints" / "step_6" / "COMPLETE").is_file()


@heavy
def test_a_rerun_keeps_the_finished_stages(quickstart_loop, capsys: pytest.CaptureFixture[str]) -> None:
    root, overrides = quickstart_loop
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/report.json")}
    started = time.perf_counter()
    assert main(["quickstart", *overrides]) == 0
    assert time.perf_counter() - started < 60  # nothing re-ran: no actor, no rank started
    out = capsys.readouterr().out
    assert out.count("exists: keeping it") == len(plan(root)) - 1 and "reusing it" in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/report.json")} == before
    # Every stage prints the stand-alone command that reproduces it.
    shared = " ".join(o for o in overrides if not o.startswith("run.dir="))
    assert f"vla-dist train {shared} train.lora.enabled=true run.dir={root / 'train-lora'}" in out


def test_a_bad_key_fails_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", f"run.dir={tmp_path}", "train.zero_stage=7"]) == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
