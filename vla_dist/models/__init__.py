"""Policies: the `VLAPolicy` interface (policy.py) and its constructors (build.py), the pi0 and
action-token families, processors.

Names resolve lazily (PEP 562): `vla_dist.models.files` (used while loading configs) stays free of
torch, while `from vla_dist.models import build_policy` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PolicyInputs": "vla_dist.models.policy",
    "PolicyBatch": "vla_dist.models.policy",
    "PolicySpec": "vla_dist.models.policy",
    "VLAPolicy": "vla_dist.models.policy",
    "build_policy": "vla_dist.models.build",
    "load_policy": "vla_dist.models.build",
    "count_parameters": "vla_dist.models.build",
    "PI0Policy": "vla_dist.models.pi0",
    "ActionTokenPolicy": "vla_dist.models.action_tokens",
    "Normalization": "vla_dist.models.processing",
    "PretrainedError": "vla_dist.models.files",
}
__all__ = [  # noqa: RUF022 - grouped as in _EXPORTS
    "PolicyInputs", "PolicyBatch", "PolicySpec", "VLAPolicy", "build_policy", "load_policy", "count_parameters",
    "PI0Policy", "ActionTokenPolicy", "Normalization", "PretrainedError",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vla_dist.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
