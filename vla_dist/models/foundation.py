"""A plain transformers checkpoint as the start of a policy (`from_foundation` of both families),
and in-place edits of parameters that ZeRO-3 may have partitioned while it loaded."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vla_dist.models import processing
from vla_dist.models.files import PretrainedError, load_hf_model, raise_on_bad_keys

if TYPE_CHECKING:
    from vla_dist.models.policy import PolicySpec


def load_foundation(path: Path, spec: PolicySpec) -> tuple[Any, Any]:
    """(the transformers model in `path` in the spec's dtype, its tokenizer), refusing a checkpoint
    whose weights do not all fit its config (transformers would only warn and leave them random) and
    a tokenizer without <bos> or <pad> (a prompt holds <bos> after the image tokens and is padded
    with <pad>). Loads on the CPU: whole, or partitioned inside a ZeRO-3 rank's
    `partitioned_loading`. Raises PretrainedError."""
    from vla_dist.models.policy import DTYPES

    hf_model, info = load_hf_model(path, dtype=DTYPES.get(spec.dtype, torch.float32))
    raise_on_bad_keys(path, info)
    tokenizer = processing.load_tokenizer(path)
    missing = [name for name in ("bos_token", "pad_token") if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise PretrainedError(f"{path / 'tokenizer_config.json'}: the tokenizer has no {' or '.join(missing)} "
                              "(a prompt holds <bos> after the image tokens and is padded with <pad>)")
    return hf_model, tokenizer


def editable(*params: nn.Parameter) -> AbstractContextManager[Any]:
    """Inside: `params` can be edited in place, also when ZeRO-3 built them partitioned (a DeepSpeed
    rank's `partitioned_loading`): then they are gathered whole and rank 0's edit is what each
    rank's partition keeps."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
    return nullcontext()
