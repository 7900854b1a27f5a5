"""ZeRO stage 0 checkpoints in files we read without unpickling anything.

At `train.zero_stage=0` DeepSpeed saves no ZeRO partitions: the module and the optimizer state are
inside the pickled step_N/mp_rank_00_model_states.pt only. DeepSpeed's `zero_to_fp32` (export) then
fails with "TypeError: 'NoneType' object is not iterable" and `ds_to_universal` (elastic resume)
has nothing to convert. So when saving a stage-0 checkpoint, rank 0 (every rank holds the whole
model and optimizer at stage 0) also writes our own copy:

    step_N/stage0_model.safetensors   engine.module.state_dict(), fp32 (the optimizer's master copy
                                      where DeepSpeed keeps one): what export loads into the policy
    step_N/stage0_optim.safetensors   per trainable parameter NAME: "exp_avg/NAME", "exp_avg_sq/NAME"
                                      (AdamW's moments): what the elastic loader needs beside the
                                      weights (step counter and LR schedule are in train_state.json)

Same-size resume at stage 0 still uses DeepSpeed's own loader (checkpoint/universal.py "same").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vla_dist.errors import VlaDistError

MODEL_FILE = "stage0_model.safetensors"
OPTIM_FILE = "stage0_optim.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_stage0(step_dir: str | os.PathLike[str]) -> bool:
    return (Path(step_dir) / MODEL_FILE).is_file()


def torch_optimizer_state(engine: Any, param: torch.nn.Parameter) -> dict[str, Any]:
    """A plain torch optimizer's state of `param` (stage 0 in fp32: DeepSpeed keeps the torch AdamW,
    possibly behind a thin wrapper exposing `.optimizer`)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return optimizer.state.setdefault(param, {}) if param.requires_grad else {}


def save_stage0(engine: Any, step_dir: str | os.PathLike[str], rank: int) -> None:
    """Rank 0 writes the two files (the others return). Call after engine.save_checkpoint."""
    if rank != 0:
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    params = dict(engine.module.named_parameters())

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        # clone: safetensors refuses tensors sharing storage (tied weights appear under two names)
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).clone().contiguous()

    weights = {}
    for name, tensor in engine.module.state_dict().items():
        param = params.get(name)
        # bf16 at stage 0 keeps an fp32 master copy in DeepSpeed's optimizer: save that, not the bf16 one
        master = safe_get_full_fp32_param(param) if param is not None and param.requires_grad else None
        weights[name] = whole(master if master is not None else tensor)
    moments = {}
    for name, param in params.items():
        if not param.requires_grad:
            continue
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:
                value = torch_optimizer_state(engine, param).get(key)
            # a trainable parameter that never got a gradient has no Adam state yet: zero moments are
            # what AdamW would start it with
            moments[f"{key}/{name}"] = whole(value) if value is not None else torch.zeros_like(whole(param))
    path = Path(step_dir)
    save_file(weights, str(path / MODEL_FILE), metadata={"format": "pt"})
    save_file(moments, str(path / OPTIM_FILE), metadata={"format": "pt"})


def load_stage0_weights(step_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The module's fp32 state dict of a stage-0 checkpoint (what export loads)."""
    from safetensors.torch import load_file

    path = Path(step_dir) / MODEL_FILE
    if not path.is_file():
        raise VlaDistError(f"{path} is missing: a train.zero_stage=0 checkpoint saved by an older vla-dist has "
                           "its weights only in DeepSpeed's pickled model-states file, which vla-dist never loads")
    return load_file(str(path))


class Stage0Tensors:
    """Per-parameter fp32 weights and Adam moments of a stage-0 checkpoint, read as the elastic
    loader asks for them (the same interface as a universal folder's: `get(name, kind, shape)`)."""

    def __init__(self, step_dir: str | os.PathLike[str]) -> None:
        from safetensors.torch import load_file

        self.source = Path(step_dir)
        self.weights = load_stage0_weights(step_dir)
        optim = self.source / OPTIM_FILE
        if not optim.is_file():
            raise VlaDistError(f"{optim} is missing: cannot resume the optimizer of this stage-0 checkpoint")
        self.moments = load_file(str(optim))

    def get(self, name: str, kind: str, shape: Any) -> torch.Tensor | None:
        tensor = self.weights.get(name) if kind == "fp32" else self.moments.get(f"{kind}/{name}")
        return None if tensor is None else tensor.reshape(shape)
