"""Elastic resume: a checkpoint saved at one world size / ZeRO stage, loaded at another.

Driver side (no torch import): `ensure_universal(step_dir)` converts run.dir/checkpoints/step_N once
with DeepSpeed's `ds_to_universal` into the sibling `step_N_universal` (written under a hidden
temporary name, renamed only when the conversion exited cleanly and the output looks whole). It is
a cache, never a resumable step dir: no COMPLETE marker, `latest` never names it, and prune drops it
with its step dir. A failed conversion removes its partial output, leaves step_N as it was, and
raises VlaDistError.

Rank side: `load_resume(engine, step_dir, mode)`:
  "same"       DeepSpeed's own loader on step_N (same world size and stage)
  "universal"  DeepSpeed's loader on step_N_universal (engine built with checkpoint.load_universal)
  "by_hand"    another ZeRO stage (or another world size at ZeRO-3): DeepSpeed's loader refuses
               the former and is not the measured route for the latter, so fp32 weights and Adam moments
               are set parameter by parameter from step_N_universal's per-parameter files, and the
               step counters and LR schedule from step_N's train_state.json.
  "stage0"     a ZeRO stage-0 checkpoint resumed at another world size or ZeRO stage: it has no ZeRO
               partitions for ds_to_universal to convert, so the same by-hand load reads the safetensors
               copy rank 0 wrote beside it (checkpoint/stage0.py). No conversion.
The by-hand load also fills a stage-0 engine (a plain torch AdamW holding whole parameters): weights
copied into the module, moments and step into the optimizer's per-parameter state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from vla_dist.errors import VlaDistError

SUFFIX = "_universal"
MODES = ("same", "universal", "by_hand", "stage0")


def universal_dir(step_dir: str | os.PathLike[str]) -> Path:
    step_dir = Path(step_dir)
    return step_dir.with_name(step_dir.name + SUFFIX)


def resume_mode(saved: dict[str, Any], world_size: int, zero_stage: int) -> str:
    """COMPLETE's info (world_size, zero_stage) vs this run -> one of MODES."""
    if saved.get("zero_stage") == 0 and (saved.get("world_size"), 0) != (world_size, zero_stage):
        return "stage0"  # nothing for ds_to_universal to convert: our own safetensors copy
    if saved.get("zero_stage") != zero_stage:
        return "by_hand"
    if saved.get("world_size") != world_size and zero_stage == 3:
        return "by_hand"  # the route measured at ZeRO-3 (DeepSpeed's universal loader there is not)
    if saved.get("world_size") != world_size:
        return "universal"
    return "same"


def needs_conversion(mode: str) -> bool:
    """Whether the driver must build step_N_universal (ensure_universal) before the ranks load."""
    return mode in ("universal", "by_hand")


def _converter_argv(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
            "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
            "--num_merge_workers", "1"]


def ensure_universal(step_dir: str | os.PathLike[str], timeout_s: float = 900) -> Path:
    """step_N -> step_N_universal (converted once, then reused). Raises VlaDistError on failure."""
    step_dir = Path(step_dir)
    final = universal_dir(step_dir)
    stamp = json.dumps({"from": step_dir.name, "complete": (step_dir / "COMPLETE").read_text(encoding="utf-8")})
    if final.is_dir():
        if (final / "SOURCE").is_file() and (final / "SOURCE").read_text(encoding="utf-8").strip() == stamp:
            return final
        shutil.rmtree(final)  # converted from an earlier checkpoint of the same name (re-saved since)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that died half-way
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    kept = (f"the original checkpoint {step_dir} is kept unchanged (still COMPLETE; `latest` untouched); "
            "resume it at its saved world size and ZeRO stage, or retry")
    try:
        proc = subprocess.run(_converter_argv(step_dir, tmp), check=False, capture_output=True, text=True, env=env,
                              timeout=timeout_s)
        problem = None
        if proc.returncode != 0:
            problem = f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:].strip()}"
        elif not (tmp / "zero").is_dir() or not any((tmp / "zero").iterdir()) or not any(tmp.glob("*model_states.pt")):
            problem = "its output has no per-parameter zero/ folder or model-states file"
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VlaDistError(f"converting {step_dir} to a universal checkpoint failed ({problem}); {kept}")
    (tmp / "SOURCE").write_text(stamp + "\n", encoding="utf-8")  # which COMPLETE checkpoint this converts
    os.replace(tmp, final)
    # ds_to_universal also leaves checkpoints/latest_universal naming its output folder, i.e. our
    # hidden temporary name, gone after the rename: a dangling pointer we never read (the ranks load
    # step_N_universal by tag), so it is removed rather than left to mislead DeepSpeed's tools
    stray = step_dir.parent / "latest_universal"
    if stray.is_file() and stray.read_text(encoding="utf-8").strip() == tmp.name:
        stray.unlink()
    return final


# ---------------------------------------------------------------- rank side (torch, DeepSpeed)


def load_resume(engine: Any, step_dir: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"resume mode {mode!r} not in {MODES}")
    if mode in ("same", "universal"):
        source = Path(step_dir) if mode == "same" else universal_dir(step_dir)
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {source}")
        return
    if mode == "stage0":
        from vla_dist.checkpoint.stage0 import Stage0Tensors

        _load_by_hand(engine, Stage0Tensors(step_dir))
    else:
        _load_by_hand(engine, UniversalTensors(universal_dir(step_dir)))


class UniversalTensors:
    """Per-parameter tensors of a universal folder: zero/NAME/{fp32,exp_avg,exp_avg_sq}.pt."""

    def __init__(self, source: Path) -> None:
        if not any(source.glob("*model_states.pt")):
            raise VlaDistError(f"{source} has no model-states file")
        self.source = source

    def get(self, name: str, kind: str, shape: Any) -> Any:
        pdir = self.source / "zero" / name
        return _read(pdir, kind, shape) if (pdir / f"{kind}.pt").is_file() else None


def _flat_groups(optimizer: Any) -> list[Any]:
    """The fp32 flat groups DeepSpeed's optimizer wrapper steps (ZeRO-3 / ZeRO-1,2 / bf16 at stage
    0); [] for a stage-0 fp32 engine, whose optimizer is the plain torch AdamW."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        groups = getattr(optimizer, name, None)
        if groups:
            return list(groups)
    return []


def _read(pdir: Path, kind: str, shape: Any) -> Any:
    """One per-parameter tensor of a universal checkpoint. ds_to_universal writes {'param': tensor,
    'cat_dim': 0} when converting a ZeRO-1/2 checkpoint but the bare tensor for a ZeRO-3 one
    (merge_zero3_slices): both are read."""
    import torch

    saved = torch.load(pdir / f"{kind}.pt", map_location="cpu", weights_only=True)
    return (saved["param"] if isinstance(saved, dict) else saved).reshape(shape)


def _load_by_hand(engine: Any, tensors: Any) -> None:
    """Set every trainable parameter's fp32 weight and Adam moments from `tensors` (a
    UniversalTensors or stage0.Stage0Tensors), then the step counters and LR schedule."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from vla_dist.checkpoint.stage0 import MOMENTS, torch_optimizer_state

    common = _train_state(tensors.source)
    steps = int(common["global_steps"])
    flat_groups = _flat_groups(engine.optimizer)
    if not flat_groups and engine.zero_optimization_stage() != 0:
        raise VlaDistError(f"loading across ZeRO stages: no flat fp32 groups in {type(engine.optimizer).__name__}")
    # Adam state for every flat group first (the setters write into existing state tensors)
    for flat in flat_groups:
        state = engine.optimizer.optimizer.state[flat]
        state["step"] = torch.tensor(float(steps))  # Adam's bias correction: one step per optimizer step
        state["exp_avg"] = torch.zeros_like(flat)
        state["exp_avg_sq"] = torch.zeros_like(flat)
    # ZeRO-1/2 (and bf16) link each parameter's fragment of that state only after the first optimizer
    # step; the optimizer-state setter below would find no fragment ("argument of type 'NoneType' is
    # not iterable"), so link now, as DeepSpeed's own step would (ZeRO-3 has no such method: not needed)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if flat_groups and link is not None:
        link()
    missing = []
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        fp32 = tensors.get(name, "fp32", shape)
        moments = {key: tensors.get(name, key, shape) for key in MOMENTS}
        if fp32 is None or any(value is None for value in moments.values()):
            missing.append(name)
            continue
        if flat_groups:
            safe_set_full_fp32_param(param, fp32)
            for key, value in moments.items():
                safe_set_full_optimizer_state(param, value, key)
        else:  # stage 0, fp32: the torch AdamW steps the module's own parameters, state keyed by parameter
            state = torch_optimizer_state(engine, param)
            state["step"] = torch.tensor(float(steps))
            for key, value in moments.items():
                state[key] = value.to(param.device, param.dtype).clone()
        # the setters update only the optimizer's fp32 master copy: the module's weights too
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.data.copy_(fp32.to(param.dtype))
    if missing:
        raise VlaDistError(f"{tensors.source} lacks {len(missing)} trainable parameters, e.g. {missing[:3]}")
    engine.global_steps = steps
    engine.global_samples = int(common.get("global_samples", 0))
    engine.skipped_steps = int(common.get("skipped_steps", 0))
    if engine.lr_scheduler is not None and common.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the groups' rate


def _train_state(source: Path) -> dict:
    """Step and LR schedule of the checkpoint a universal folder was converted from, from our own
    JSON (never DeepSpeed's pickled model-states file)."""
    import json

    from vla_dist.checkpoint.manager import TRAIN_STATE

    for folder in (source, source.with_name(source.name.removesuffix("_universal"))):
        if (folder / TRAIN_STATE).is_file():
            return json.loads((folder / TRAIN_STATE).read_text())
    raise VlaDistError(f"{source}: no {TRAIN_STATE} beside the checkpoint (saved by an older vla-dist?)")

