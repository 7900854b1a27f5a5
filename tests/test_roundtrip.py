"""Round trip: a policy trained to memorize a handful of layouts replays them in closed loop.

Everything between the shards and the simulator is on this path: window cutting and action chunks
(WindowLoader), normalization and its inverse, camera order, image preprocessing, the saved and
exported policy, `ModelPolicy.act` with temporal ensembling (as the recipes evaluate), the control
rate. A unit, sign, order or off-by-one bug anywhere in it makes the memorized policy miss on the
very layouts it learned; a policy that cannot even do that cannot be expected to generalize. The
floor (at least 3 of the 4 layouts, the grasp point near the cube) must hold; below the 90% target
(4 of 4) the test reports xfail with the figures.
Real commands end to end: `vla-dist collect`, `vla-dist train` (DeepSpeed, one Ray-placed rank), `vla-dist eval
eval.seeds=collection` on the session's sim actors. No mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vla_dist.cli import main

LAYOUTS = 4  # layouts memorized per task (collection episodes 0..3 of run.seed 0)
MIN_SUCCESS = 0.9
MAX_APPROACH_CM = 5.0  # mean closest grasp-point approach to the cube over the memorized layouts

# Per family: what it takes to memorize 4 layouts (tiny-pi0 after 500 steps: 3 of 4, loss 0.094;
# action tokens after 1000 steps: 3 of 4, after 2000: 4 of 4, closest 0.54 cm).
FAMILIES = {
    "tiny-pi0": ["model.state_inputs=[gripper_width]", "train.steps=1000", "train.lr=1e-3"],
    "tiny-openvla": ["train.steps=2000", "train.lr=1e-3"],
}
# pi0 (the recipes' family) on pick in CI (~6 min on 2 cores); action tokens on pick (~7 min) and pi0
# on push (where held-out success is lowest) by hand, before a release or after touching their paths:
# a miss there would point at the path, not at generalization.
CASES = [
    pytest.param("tiny-pi0", "pick_cube", marks=pytest.mark.ci),
    ("tiny-openvla", "pick_cube"),
    ("tiny-pi0", "push_cube"),
]


@pytest.fixture(scope="module")
def memorized_layouts(tmp_path_factory: pytest.TempPathFactory, genesis_kernels: None) -> Callable[[str], Path]:
    """task -> its data dir: `vla-dist collect` of LAYOUTS demonstrations of the task, as a user runs
    it, once per task for the module."""
    root = tmp_path_factory.mktemp("roundtrip")
    collected: dict[str, Path] = {}

    def collect(task: str) -> Path:
        if task not in collected:
            command = [sys.executable, "-m", "vla_dist", "collect", f"task.name={task}",
                       f"collect.episodes={LAYOUTS}", f"run.dir={root / task / 'collect'}",
                       f"data.dir={root / task / 'data'}", "collect.num_videos=0"]
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            collected[task] = root / task / "data"
        return collected[task]

    return collect


@pytest.mark.heavy
@pytest.mark.parametrize(("preset", "task"), CASES)
def test_memorized_layouts_succeed_in_closed_loop(preset: str, task: str, memorized_layouts: Callable[[str], Path],
                                                  local_ray: None, tmp_path: Path) -> None:
    common = [f"data.dir={memorized_layouts(task)}", f"task.name={task}", f"model.preset={preset}",
              "cluster.num_cpus=2"]
    train_dir = tmp_path / "train"
    assert main(["train", *common, f"run.dir={train_dir}", "train.world_size=1", "train.cpus_per_rank=2",
                 "train.zero_stage=1", "train.micro_batch_size=16", "train.save_every=0", "train.warmup_steps=20",
                 "data.shuffle_buffer=1024", "data.num_workers=0", *FAMILIES[preset]]) == 0
    eval_dir = tmp_path / "eval"
    assert main(["eval", *common, f"run.dir={eval_dir}", f"eval.checkpoint={train_dir}", "eval.seeds=collection",
                 f"eval.episodes={LAYOUTS}", "eval.temporal_ensemble=0.01", "eval.num_videos=0",
                 f"collect.envs_per_actor={LAYOUTS // 2}"]) == 0
    report = json.loads((eval_dir / "report.json").read_text())
    final_loss = json.loads((train_dir / "report.json").read_text())["final_loss"]
    print(f"{preset} {task}: {report['successes']}/{report['episodes']} memorized layouts, closest approach "
          f"{report['closest_approach_cm']} cm, final loss {final_loss:.4f}")
    assert report["seeds"] == "collection" and report["episodes"] == LAYOUTS
    # A unit, sign, camera-order or chunking bug leaves the arm nowhere near the cube (an untrained
    # policy: 0%, ~40 cm). This floor must hold: at most one of the four layouts missed (a float
    # difference between CPUs can move one memorized grasp), the grasp point near the cube.
    assert report["successes"] >= LAYOUTS - 1 and report["closest_approach_cm"] < MAX_APPROACH_CM, report
    if report["success_rate"] < MIN_SUCCESS:
        # 3 of 4: reported with the figures rather than failed. Measured on 2 cores with temporal
        # ensembling (2026-12-01): pick, pi0 4/4 (0.65 cm), action tokens 4/4 (0.54 cm); push, pi0 4/4.
        pytest.xfail(f"{preset} {task} replays {report['successes']}/{LAYOUTS} memorized layouts (target "
                     f"{MIN_SUCCESS:.0%}), closest approach {report['closest_approach_cm']} cm")
