"""Elastic resume: a 2-rank ZeRO-2 checkpoint continued on 1 rank (universal checkpoint, DeepSpeed's
loader) and at ZeRO-3 (by-hand loader), against the uninterrupted 2-rank run; and more combinations,
each against its own uninterrupted run: ZeRO-3 2 -> 1 rank, 3 -> 2 ranks, LoRA 2 -> 1 rank (ZeRO-2
and ZeRO-3), ZeRO stage 0 to 1 rank / ZeRO-3 / ZeRO-2, and ZeRO-2 to stage 0 (2 and 1 ranks).
Real DeepSpeed on gloo ranks in the session's Ray; tiny-pi0 on the quickstart dataset; no mocks
except the injected conversion failure.

train.fixed_batches=true: every step's global batch is the same windows/noise whatever the world
size (global micro-batch g = micro * world_size + rank, g < world_size * grad_accum), so 2 ranks x 1
micro-batch of 4 and 1 rank x 2 micro-batches of 4 see the same 8 windows per step, as do 3 ranks x
2 micro-batches of 2 and 2 ranks x 3 micro-batches of 2 the same 12."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vla_dist.checkpoint import manager as ckpt
from vla_dist.checkpoint import universal
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.errors import VlaDistError
from vla_dist.train import run_train
from vla_dist.train.metrics import read_metrics

# Eighteen DeepSpeed runs (six uninterrupted base runs, twelve elastic resumes): about 6 minutes on 2
# cores, plus the quickstart dataset: those tests are marked heavy (run after the main suite). The
# checkpoint-directory tests at the end need no training and run in the main suite.
heavy = pytest.mark.heavy

STEPS, SAVE = 8, 4
# measured: 2 -> 1 rank and ZeRO-2 -> ZeRO-3 differ from the uninterrupted run only by float summation
# order (all-reduce vs gradient accumulation; flat partition layout): well under this. Max |loss
# delta| measured on 2 CPU cores: 0 for every combination except 3 -> 2 ranks, 1e-8 (six micro-batch
# gradients summed in another order; with two, a/2 + b/2 == (a + b)/2 exactly)
REL, ABS = 1e-4, 1e-6


def cfg_for(run_dir: Path, data_dir: Path, *overrides: str):
    return validate(load_config(None, [f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2",
                                       "train.world_size=2", "train.micro_batch_size=4", "train.lr=3e-3",
                                       "train.fixed_batches=true", f"train.steps={STEPS}",
                                       f"train.save_every={SAVE}", "train.zero_stage=2", *overrides]))


BaseRun = Callable[..., tuple[Any, list[dict[str, Any]]]]


@pytest.fixture(scope="module")
def base_runs(quickstart_run, local_ray, tmp_path_factory) -> BaseRun:
    """base_runs(name, *overrides): an uninterrupted run (checkpoints at steps 4 and 8), trained
    once per module on first request -> (its config, its metrics rows)."""
    _, data_dir, _ = quickstart_run
    done: dict[str, tuple[Any, list[dict[str, Any]]]] = {}

    def get(name: str, *overrides: str) -> tuple[Any, list[dict[str, Any]]]:
        if name not in done:
            cfg = cfg_for(tmp_path_factory.mktemp("elastic") / name, data_dir, *overrides)
            run_train(cfg)
            done[name] = cfg, read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
        return done[name]

    return get


@pytest.fixture(scope="module")
def base_run(base_runs: BaseRun):
    """The uninterrupted 2-rank ZeRO-2 run (checkpoints at steps 4 and 8)."""
    return base_runs("base")


def crashed_copy(base_cfg, dest: Path) -> Path:
    """The base run as if it had died after step 4's checkpoint (step 8's never completed)."""
    shutil.copytree(base_cfg.run.dir, dest)
    (ckpt.step_dir(dest, STEPS) / ckpt.COMPLETE).unlink()
    return dest


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def assert_continues(rows, again, label):
    assert [row["step"] for row in again] == list(range(1, STEPS + 1))
    # rows of the new run
    assert all(a["elapsed_s"] != b["elapsed_s"] for a, b in zip(rows[SAVE:], again[SAVE:], strict=True))
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(rows[SAVE:], again[SAVE:], strict=True)]
    print(f"{label}: max |loss delta| after resume = {max(deltas):.3g}; per step {[f'{d:.2g}' for d in deltas]}")
    for before, after in zip(rows[SAVE:], again[SAVE:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=REL, abs=ABS), (label, before, after)
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-9), (label, before, after)  # schedule position
    # the run before the resume is untouched in metrics.jsonl
    assert [r["loss"] for r in again[:SAVE]] == [r["loss"] for r in rows[:SAVE]]


@heavy
def test_two_ranks_to_one_rank_continues_the_loss(base_run, tmp_path):
    cfg, rows = base_run
    run_dir = crashed_copy(cfg, tmp_path / "to1")
    source = ckpt.step_dir(run_dir, SAVE)
    before = tree(source)
    # same global batch (8): 1 rank x 2 micro-batches of 4
    report = run_train(cfg_for(run_dir, Path(cfg.data.dir), "train.world_size=1", "train.grad_accum=2"))
    assert report["first_step"] == SAVE and report["resumed_from"].endswith(f"step_{SAVE}")
    assert_continues(rows, read_metrics(run_dir / "metrics.jsonl"), "ZeRO-2 2 ranks -> 1 rank (universal)")
    conv = universal.universal_dir(source)
    assert conv.is_dir() and not ckpt.is_complete(conv) and (conv / "zero").is_dir()
    assert tree(source) == before  # the original checkpoint is only read
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, STEPS)
    saved = json.loads((ckpt.step_dir(run_dir, STEPS) / ckpt.COMPLETE).read_text())
    assert saved["world_size"] == 1
    # cached: a second resume reuses the conversion instead of converting again
    stamp = (conv / "SOURCE").stat().st_mtime_ns
    assert universal.ensure_universal(source) == conv and (conv / "SOURCE").stat().st_mtime_ns == stamp


@heavy
@pytest.mark.parametrize("offload", [False, True], ids=["zero3", "zero3_offload_optimizer"])
def test_zero2_to_zero3_continues_the_loss(base_run, tmp_path, offload):
    cfg, rows = base_run
    run_dir = crashed_copy(cfg, tmp_path / "to3")
    report = run_train(cfg_for(run_dir, Path(cfg.data.dir), "train.zero_stage=3",
                               f"train.offload_optimizer={str(offload).lower()}"))
    assert report["first_step"] == SAVE and report["zero_stage"] == 3
    assert_continues(rows, read_metrics(run_dir / "metrics.jsonl"),
                     f"ZeRO-2 -> ZeRO-3{' + optimizer offload' if offload else ''}, 2 ranks (by hand)")
    assert json.loads((ckpt.step_dir(run_dir, STEPS) / ckpt.COMPLETE).read_text())["zero_stage"] == 3


# (id, base run's name and overrides, the resumed run's overrides, the route checkpoint/universal.py
# takes). Runs of the same base name share one uninterrupted run. Each resumed run keeps its base's
# global batch (see the module docstring). The 3-rank base shares the session's 2-CPU Ray: half a
# CPU per rank.
LORA = ("train.lora.enabled=true", "train.lora.r=4")
ZERO0 = ("train.zero_stage=0",)
ELASTIC = [
    ("zero3_2_to_1_rank", "zero3", ("train.zero_stage=3",),
     ("train.zero_stage=3", "train.world_size=1", "train.grad_accum=2"), "by_hand"),
    ("zero2_3_to_2_ranks", "zero2_3_ranks", ("train.world_size=3", "train.cpus_per_rank=0.5",
                                             "train.micro_batch_size=2", "train.grad_accum=2"),
     ("train.world_size=2", "train.micro_batch_size=2", "train.grad_accum=3"), "universal"),
    ("lora_zero2_2_to_1_rank", "lora_zero2", LORA, (*LORA, "train.world_size=1", "train.grad_accum=2"), "universal"),
    ("lora_zero3_2_to_1_rank", "lora_zero3", (*LORA, "train.zero_stage=3"),
     (*LORA, "train.zero_stage=3", "train.world_size=1", "train.grad_accum=2"), "by_hand"),
    # ZeRO stage 0 (no partitions: its own safetensors copy, checkpoint/stage0.py), from and to
    ("zero0_2_to_1_rank", "zero0", ZERO0, (*ZERO0, "train.world_size=1", "train.grad_accum=2"), "stage0"),
    ("zero0_to_zero3", "zero0", ZERO0, ("train.zero_stage=3",), "stage0"),
    ("zero0_to_zero2_1_rank", "zero0", ZERO0, ("train.world_size=1", "train.grad_accum=2"), "stage0"),
    ("zero2_to_zero0", "base", (), ZERO0, "by_hand"),
    ("zero2_to_zero0_1_rank", "base", (), (*ZERO0, "train.world_size=1", "train.grad_accum=2"), "by_hand"),
]


@heavy
@pytest.mark.parametrize(("name", "base", "resumed", "route"), [pytest.param(*c[1:], id=c[0]) for c in ELASTIC])
def test_elastic_resume_continues_the_loss(base_runs: BaseRun, tmp_path, request, name, base, resumed, route):
    label = request.node.callspec.id
    cfg, rows = base_runs(name, *base)  # this combination's own uninterrupted run
    run_dir = crashed_copy(cfg, tmp_path / "resumed")
    source = ckpt.step_dir(run_dir, SAVE)
    saved = json.loads((source / ckpt.COMPLETE).read_text())
    resumed_cfg = cfg_for(run_dir, Path(cfg.data.dir), *resumed)
    assert universal.resume_mode(saved, resumed_cfg.train.world_size, resumed_cfg.train.zero_stage) == route
    report = run_train(resumed_cfg)
    assert report["first_step"] == SAVE and report["resumed_from"].endswith(f"step_{SAVE}")
    assert report["world_size"] == resumed_cfg.train.world_size and report["zero_stage"] == resumed_cfg.train.zero_stage
    assert (saved["world_size"], saved["zero_stage"]) != (report["world_size"], report["zero_stage"])  # elastic
    assert_continues(rows, read_metrics(run_dir / "metrics.jsonl"), f"{label} ({route})")
    conv = universal.universal_dir(source)
    # a stage-0 source is read from its own safetensors copy: nothing converted
    assert conv.is_dir() == (route != "stage0") and not ckpt.is_complete(conv)
    assert not (ckpt.checkpoints_dir(run_dir) / "latest_universal").exists()  # DeepSpeed's dangling pointer
    final = json.loads((ckpt.step_dir(run_dir, STEPS) / ckpt.COMPLETE).read_text())
    assert (final["world_size"], final["lora"]) == (resumed_cfg.train.world_size, resumed_cfg.train.lora.enabled)
    if resumed_cfg.train.lora.enabled:  # the resumed run's adapter is whole (gathered under ZeRO-3 too)
        from safetensors.torch import load_file

        adapter = load_file(ckpt.step_dir(run_dir, STEPS) / "adapter" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())


@heavy
def test_failed_conversion_keeps_the_checkpoint_and_says_so(base_run, tmp_path, monkeypatch):
    cfg, _ = base_run
    run_dir = crashed_copy(cfg, tmp_path / "fails")
    source = ckpt.step_dir(run_dir, SAVE)
    before, latest_before = tree(ckpt.checkpoints_dir(run_dir)), ckpt.latest_checkpoint(run_dir)

    def half_written(src: Path, out: Path) -> list[str]:  # writes part of its output, then dies
        script = (f"import os, sys; os.makedirs({str(out)!r} + '/zero/x'); open({str(out)!r} + '/zero/x/fp32.pt', 'w')"
                  ".write('partial'); sys.exit('killed half-way')")
        return [universal.sys.executable, "-c", script]

    monkeypatch.setattr(universal, "_converter_argv", half_written)
    with pytest.raises(VlaDistError, match=r"universal checkpoint failed.*killed half-way.*step_4 is kept unchanged"):
        run_train(cfg_for(run_dir, Path(cfg.data.dir), "train.world_size=1", "train.grad_accum=2"))
    after = tree(ckpt.checkpoints_dir(run_dir))
    assert after == before  # nothing added (no partial output), nothing changed
    assert ckpt.latest_checkpoint(run_dir) == latest_before == source and ckpt.is_complete(source)


def test_prune_drops_universal_caches_with_their_step(tmp_path):
    for step in (1, 2, 3):
        ckpt.step_dir(tmp_path, step).mkdir(parents=True)
        ckpt.mark_complete(ckpt.step_dir(tmp_path, step), step, {})
        universal.universal_dir(ckpt.step_dir(tmp_path, step)).mkdir()
    ckpt.prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir() if p.is_dir())
    assert left == ["step_2", "step_2_universal", "step_3", "step_3_universal"]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 3)  # a cache is never `latest`


def test_resume_mode():
    assert universal.resume_mode({"world_size": 2, "zero_stage": 2}, 2, 2) == "same"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 2}, 1, 2) == "universal"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 2}, 2, 3) == "by_hand"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 2}, 1, 3) == "by_hand"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 3}, 1, 3) == "by_hand"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 3}, 2, 3) == "same"
    assert universal.resume_mode({"world_size": 3, "zero_stage": 2}, 2, 2) == "universal"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 0}, 2, 0) == "same"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 0}, 1, 0) == "stage0"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 0}, 2, 3) == "stage0"
    assert universal.resume_mode({"world_size": 2, "zero_stage": 2}, 2, 0) == "by_hand"
    assert not universal.needs_conversion("stage0") and universal.needs_conversion("by_hand")


def test_a_stale_conversion_is_redone(tmp_path, monkeypatch):
    """step_N re-saved (e.g. by a train.resume=never run) after it was converted: the cache is not reused."""
    step = ckpt.step_dir(tmp_path, 4)
    step.mkdir(parents=True)
    ckpt.mark_complete(step, 4, {"world_size": 2})

    def fake(src: Path, out: Path) -> list[str]:  # a conversion's output layout, without DeepSpeed
        script = (f"import os; os.makedirs({str(out)!r} + '/zero/w'); "
                  f"open({str(out)!r} + '/mp_rank_00_model_states.pt', 'w').write('x')")
        return [universal.sys.executable, "-c", script]

    monkeypatch.setattr(universal, "_converter_argv", fake)
    first = universal.ensure_universal(step)
    assert universal.ensure_universal(step) == first and (first / "zero" / "w").is_dir()
    (first / "zero" / "marker").write_text("from the first conversion")
    ckpt.mark_complete(step, 4, {"world_size": 2})  # re-saved: a new COMPLETE
    again = universal.ensure_universal(step)
    assert again == first and not (again / "zero" / "marker").exists()
    assert not ckpt.is_complete(again) and ckpt.latest_checkpoint(tmp_path) == step
