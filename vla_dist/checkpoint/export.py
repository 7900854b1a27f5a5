"""`vla-dist export --checkpoint DIR --out DIR [--merge-lora]`: a training checkpoint -> a policy
directory `load_policy` (and `vla-dist eval eval.checkpoint=OUT`) reads.

- full fine-tune: DeepSpeed's ZeRO shards consolidated to fp32 (zero_to_fp32), loaded into the
  policy rebuilt from train_meta.json, written with save_pretrained (HF safetensors + our files);
- LoRA, --merge-lora: the adapter merged into the base, written as a plain policy;
- LoRA, no merge: the base policy at OUT and the peft adapter at OUT/adapter (`load_exported`
  applies it; `PeftModel.from_pretrained(policy.hf_model, OUT/adapter)` does the same by hand).
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
    from vla_dist.models.policy import build_policy

    torch.manual_seed(meta["seed"])
    return build_policy(ModelSection(**meta["model"]), meta["manifest"])


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                      merge_lora: bool = False) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    step_dir = resolve_checkpoint(checkpoint)
    meta = json.loads((step_dir / ckpt.META).read_text(encoding="utf-8"))
    out = Path(out)
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
            kind = "adapter"
    else:
        if merge_lora:
            raise ConfigError("--merge-lora", f"{step_dir} is a full fine-tune (train.lora.enabled=false): nothing to merge")
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError("--checkpoint", f"{step_dir} does not fit the policy of its train_meta.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        policy.save_pretrained(out)
        kind = "full"
    return {"command": "export", "checkpoint": str(step_dir), "step": meta["step"], "out": str(out), "kind": kind}


def load_exported(path: str | os.PathLike[str]) -> Any:
    """load_policy, plus the peft adapter when the export holds one (unmerged LoRA)."""
    from vla_dist.models.policy import load_policy

    policy = load_policy(path)
    if (Path(path) / ADAPTER / "adapter_config.json").is_file():
        from peft import PeftModel

        policy.hf_model = PeftModel.from_pretrained(policy.hf_model, str(Path(path) / ADAPTER))
    return policy
