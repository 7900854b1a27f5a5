"""LoRA on a policy's transformers model (peft), and saving the adapter from a ZeRO engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vla_dist.config.schema import LoraSection
from vla_dist.models.files import weights_readable_like
from vla_dist.models.policy import VLAPolicy


def apply_lora(policy: VLAPolicy, lora: LoraSection) -> VLAPolicy:
    """Wrap `policy.hf_model` in a peft model on the family's LoRA targets; the base is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=policy.lora_target_modules())
    policy.hf_model = get_peft_model(policy.hf_model, config)
    return policy


def is_lora(policy: VLAPolicy) -> bool:
    from peft import PeftModel

    return isinstance(policy.hf_model, PeftModel)


def save_adapter(module: VLAPolicy, out_dir: str | os.PathLike[str], rank: int) -> None:
    """Collective: every rank must call it. Under ZeRO-3 the trainable parameters are partitioned
    (each rank holds a slice; saving them as they are writes empty tensors), so they are gathered
    first; rank 0 writes adapter_config.json + adapter_model.safetensors."""
    import deepspeed

    trainable = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if rank == 0:
            peft_model: Any = module.hf_model
            peft_model.save_pretrained(str(out_dir), safe_serialization=True)
            weights_readable_like(out_dir, Path(out_dir) / "adapter_config.json")


def trainable_count(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting ZeRO-3 partitioned ones at full size."""
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(module.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
