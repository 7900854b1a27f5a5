"""`vla-dist export --checkpoint DIR --out DIR [--merge-lora]`: a training checkpoint -> a policy
directory `load_policy` (and `vla-dist eval eval.checkpoint=OUT`) reads.

- full fine-tune: DeepSpeed's ZeRO shards consolidated to fp32 (zero_to_fp32; at train.zero_stage=0,
  which has no shards, the safetensors copy of checkpoint/stage0.py), loaded into the policy rebuilt
  from train_meta.json, written with save_pretrained (HF safetensors + our files);
- LoRA, --merge-lora: the adapter merged into the base, written as a plain policy;
- LoRA, no merge: the base policy at OUT and the peft adapter at OUT/adapter; `load_policy` (so
  `vla-dist eval eval.checkpoint=OUT` and `model.pretrained=OUT`) merges the adapter on load, the
  same weights as a --merge-lora export (`PeftModel.from_pretrained(base, OUT/adapter)` by hand).
The base of a LoRA run is rebuilt as training built it: model.pretrained, or the preset's random
init under run.seed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vla_dist.checkpoint import manager as ckpt
from vla_dist.errors import ConfigError
from vla_dist.models.files import weights_readable_like

ADAPTER = "adapter"


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A step dir, a checkpoints dir or a run dir -> a complete step dir."""
    path = Path(path)
    if ckpt.is_complete(path):
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = ckpt.latest_checkpoint(run_dir)
    if found is not None:
        return found
    raise ConfigError("--checkpoint", f"{path} is not a complete checkpoint (run.dir/checkpoints/step_N with "
                      f"{ckpt.COMPLETE}), nor a run or checkpoints directory holding one")


def rebuild_policy(meta: dict[str, Any]) -> Any:
    import torch

    from vla_dist.config.schema import ModelSection
    from vla_dist.models.build import build_policy

    torch.manual_seed(meta["seed"])
    return build_policy(ModelSection(**meta["model"]), meta["manifest"])


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                      merge_lora: bool = False) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    step_dir = resolve_checkpoint(checkpoint)
    meta = json.loads((step_dir / ckpt.META).read_text(encoding="utf-8"))
    out = Path(out)
    if meta.get("kind") == "rl":  # `vla-dist rl` saves its policy directory in every checkpoint
        return _export_rl(step_dir, meta, out, merge_lora)
    policy = rebuild_policy(meta)
    lora = bool(meta["lora"]["enabled"])
    if lora:
        from peft import PeftModel

        if merge_lora:
            policy.hf_model = PeftModel.from_pretrained(policy.hf_model, str(step_dir / ADAPTER)).merge_and_unload()
            policy.save_pretrained(out)
            kind = "merged"
        else:
            policy.save_pretrained(out)
            shutil.copytree(step_dir / ADAPTER, out / ADAPTER, dirs_exist_ok=True)
            # readable by other users even from a checkpoint that saved its adapter 0600 (older runs)
            weights_readable_like(out / ADAPTER, out / ADAPTER / "adapter_config.json")
            kind = "adapter"
    else:
        if merge_lora:
            raise ConfigError("--merge-lora",
                              f"{step_dir} is a full fine-tune (train.lora.enabled=false): nothing to merge")
        if meta.get("zero_stage") == 0:  # no ZeRO partitions for zero_to_fp32: rank 0's safetensors copy
            from vla_dist.checkpoint.stage0 import load_stage0_weights

            state = load_stage0_weights(step_dir)
        else:
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )

            from vla_dist.runtime import captured_output

            with captured_output():  # its prints and progress bars ("Processing zero checkpoint ...")
                state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        from vla_dist.models.object_head import without_object_head

        # training's object head (train.object_target) is not part of the policy it saves
        missing, unexpected = policy.load_state_dict(without_object_head(state), strict=False)
        # zero_to_fp32 leaves frozen parameters out at ZeRO-1 (its stage-1 checkpoints do not record
        # them); they never change in training, so the rebuilt policy (same init, same seed) holds them
        frozen = {name for name, param in policy.named_parameters() if not param.requires_grad}
        missing = [name for name in missing if name not in frozen]
        if missing or unexpected:
            raise ConfigError("--checkpoint", f"{step_dir} does not fit the policy of its train_meta.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        policy.save_pretrained(out)
        kind = "full"
    return {"command": "export", "checkpoint": str(step_dir), "step": meta["step"], "out": str(out), "kind": kind}



def _export_rl(step_dir: Path, meta: dict[str, Any], out: Path, merge_lora: bool) -> dict[str, Any]:
    """An rl checkpoint's policy/ (base + adapter/ for LoRA runs), copied, or with --merge-lora loaded
    (load_policy merges the adapter) and written whole."""
    source = step_dir / "policy"
    lora = bool(meta["lora"]["enabled"])
    if merge_lora and not lora:
        raise ConfigError("--merge-lora", f"{step_dir} is a full fine-tune (train.lora.enabled=false): "
                          "nothing to merge")
    if merge_lora:
        from vla_dist.models.build import load_policy

        load_policy(source).save_pretrained(out)
        kind = "merged"
    else:
        shutil.copytree(source, out, dirs_exist_ok=True)
        kind = "adapter" if lora else "full"
    return {"command": "export", "checkpoint": str(step_dir), "step": meta["step"], "out": str(out), "kind": kind}
