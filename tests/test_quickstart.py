"""`vla-dist quickstart`: collect -> eval -> train (full, LoRA) -> eval, end to end on the real stack
(Genesis actors, DeepSpeed ranks over gloo in the session's Ray), at a test-sized budget."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.config import load_config, validate
from vla_dist.quickstart import SIZING, plan, stage_overrides
from vla_dist.stages import dependents

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]


# Seven stages (four evals, two DeepSpeed runs at the quickstart's batch 32): about 16 minutes on 2 cores.
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


def wilson_95(successes: int, n: int) -> list[float]:
    """The Wilson score interval (z = 1.96) as the roots of its defining quadratic, to 4 decimals."""
    rate, z2 = successes / n, 1.96**2
    roots = np.roots([1 + z2 / n, -(2 * rate + z2 / n), rate * rate]).real
    return [round(float(roots.min()), 4), round(float(roots.max()), 4)]


def lora_parameter_count(overrides: list[str]) -> tuple[int, int, int]:
    """(all, trainable, LoRA) parameters of the policy the train stages build, counted here: LoRA adds
    r x (in + out) per targeted Linear (A: r x in, B: out x r, no bias)."""
    import re

    import torch

    from vla_dist.data import read_manifest
    from vla_dist.models import build_policy

    cfg = load_config(None, [*SIZING, *overrides])
    policy = build_policy(cfg.model, read_manifest(cfg.data.dir))
    targets = policy.lora_target_modules()
    assert isinstance(targets, str)
    lora = sum(cfg.train.lora.r * (module.in_features + module.out_features)
               for name, module in policy.hf_model.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(targets, name))
    params = list(policy.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), lora


@heavy
def test_quickstart_compares_the_policies_before_and_after_training(quickstart_loop) -> None:
    from vla_dist.train.metrics import read_metrics

    root, overrides = quickstart_loop
    summary = json.loads((root / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["policies"]}
    assert list(rows) == ["expert", "untrained", "full", "lora"]
    assert summary["dataset_episodes"] == 8  # from the manifest, whether collect wrote or reused the dataset
    assert rows["expert"]["successes"] >= 1  # the expert picks the cube (100/100 seeds measured)
    for name, row in rows.items():
        # each row is its eval stage's report, summarized: nothing recomputed or lost on the way
        report = json.loads((root / f"eval-{name}" / "report.json").read_text())
        keys = ("episodes", "successes", "success_rate", "ci95", "closest_approach_cm")
        assert {key: row[key] for key in keys} == {key: report[key] for key in keys}, name
        assert row["per_task"] == {"pick_cube": report["per_task"]["pick_cube"]["success_rate"]}, name
        assert row["episodes"] == 2 and row["success_rate"] == row["successes"] / 2, name
        assert row["ci95"] == wilson_95(row["successes"], 2), name
        assert row["closest_approach_cm"] is not None and row["closest_approach_cm"] > 0
        line = f"| {row['label']} | {row['successes']}/2 ({row['success_rate']:.0%}) |"
        assert line in (root / "summary.md").read_text(), line
    # The expert's gripper reaches the cube: its grasp point closes to within a few centimetres.
    assert rows["expert"]["closest_approach_cm"] < 3.0
    for name in ("full", "lora"):
        training = summary["training"][name]
        report = json.loads((root / f"train-{name}" / "report.json").read_text())
        assert training == {key: report[key] for key in training}, name  # the train stage's report, as is
        # 6 steps prove the loop, not learning (tests/test_train.py checks the loss falls): the losses
        # summarized are the first and last of the run's metrics
        losses = [row for row in read_metrics(root / f"train-{name}" / "metrics.jsonl") if "loss" in row]
        assert [row["step"] for row in losses] == [1, 2, 3, 4, 5, 6]
        assert (training["first_loss"], training["final_loss"]) == (losses[0]["loss"], losses[-1]["loss"])
        # full: one rank with both cores (SIZING); LoRA: 2 ranks at ZeRO-2 (its stage's sizing); the
        # test's train.steps=6 wins over both budgets
        assert (training["steps"], training["world_size"], training["zero_stage"]) == {"full": (6, 1, 1),
                                                                                       "lora": (6, 2, 2)}[name]
        assert training["checkpoint"] == str(root / f"train-{name}" / "checkpoints" / "step_6")
        eval_report = json.loads((root / f"eval-{name}" / "report.json").read_text())
        assert eval_report["checkpoint"] == str(root / f"eval-{name}" / "policy")  # exported from the run
    lora, full = summary["training"]["lora"], summary["training"]["full"]
    # LoRA adapts the full fine-tune's exported policy, not a random init
    lora_config = load_config(str(root / "train-lora" / "config.yaml"), [])
    assert lora_config.model.pretrained == str(root / "eval-full" / "policy")
    assert lora_config.train.lora.enabled
    assert not load_config(str(root / "train-full" / "config.yaml"), []).train.lora.enabled
    total, trainable, adapters = lora_parameter_count(overrides)
    assert (full["parameters"], full["trainable_parameters"]) == (total, trainable)
    assert (lora["parameters"], lora["trainable_parameters"]) == (total + adapters, adapters)
    # every stage timed, inside the whole run's wall time (each stage rounded to 0.1 s)
    assert list(summary["stage_seconds"]) == [stage.name for stage in plan(root)]
    assert sum(summary["stage_seconds"].values()) <= summary["wall_s"] + 0.05 * 8
    assert (root / "summary.png").stat().st_size > 0
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
    shared = [o for o in overrides if not o.startswith("run.dir=")]
    lora = next(stage for stage in plan(root) if stage.name == "train-lora")
    assert shlex.join(["vla-dist", "train", *SIZING, *lora.sizing, *shared, "train.lora.enabled=true",
                       f"model.pretrained={root / 'eval-full' / 'policy'}", f"run.dir={root / 'train-lora'}"]) in out


def test_a_bad_key_fails_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", f"run.dir={tmp_path}", "train.zero_stage=7"]) == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_every_stage_reading_an_earlier_stage_output_defers_that_check(tmp_path: Path) -> None:
    """A stage override that names another stage's directory (a training run, an export) cannot be
    checked before that stage ran: it must be listed in made_earlier, or the up-front check of a fresh
    quickstart fails on a path that does not exist yet."""
    for stage in plan(tmp_path):
        naming_a_stage = {o.split("=", 1)[0] for o in stage.overrides if str(tmp_path) in o}
        assert naming_a_stage == set(stage.made_earlier), stage.name
    assert {stage.name for stage in plan(tmp_path) if stage.made_earlier} == {"eval-full", "train-lora", "eval-lora"}


def test_a_stage_run_again_sets_aside_the_stages_made_from_its_output(tmp_path: Path) -> None:
    """`vla-dist quickstart train.steps=5000` over an earlier quickstart resumes train-full to 5000 steps;
    what was made from its shorter run must not be kept as the new one's: its evaluation, the LoRA run
    started from that evaluation's export, and LoRA's evaluation."""
    stages = plan(tmp_path)
    configs = [validate(load_config(None, [*stage_overrides(stage, [f"run.dir={tmp_path}"], tmp_path),
                                           *(f"{key}=null" for key in stage.made_earlier)])) for stage in stages]
    names = [stage.name for stage in stages]
    made_from = {name: {names[j] for j in later} for name, later in zip(names, dependents(stages, configs),
                                                                         strict=True)}
    assert made_from["train-full"] == {"eval-full", "train-lora", "eval-lora"}
    assert made_from["eval-full"] == {"train-lora", "eval-lora"}
    assert made_from["train-lora"] == {"eval-lora"}
    assert made_from["eval-expert"] == made_from["eval-lora"] == set()
    # a dataset collected anew: every policy trained on it, and the untrained preset built from its statistics
    assert made_from["collect"] == {"eval-untrained", "train-full", "eval-full", "train-lora", "eval-lora"}
