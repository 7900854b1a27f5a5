"""Shared pieces of `vla-dist bench`: the report every bench returns and the device it names."""

from __future__ import annotations

import os
import platform
from typing import Any


def bench_report(
    name: str,
    value: float,
    unit: str,
    baseline: float,
    ratio: float,
    ratio_definition: str,
    device: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The report `vla-dist bench NAME` prints as the last line of stdout (one JSON object): the
    figure (`value`, in `unit`), its `baseline` measured in the same run, their `ratio` as
    `ratio_definition` says (value / baseline, or its inverse for latencies and sizes), the `device`
    (default: this machine's, describe_device()), then the bench's own `extra` keys, in that order."""
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "ratio_definition": ratio_definition,
        "device": describe_device() if device is None else device,
        **extra,
    }


def describe_device() -> str:
    """'cpu: <model>, N cores' or the CUDA device name: benchmark figures are meaningless without it."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"
