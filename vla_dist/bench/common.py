"""Shared pieces of `vla-dist bench`: the device description every report carries."""

from __future__ import annotations

import os
import platform


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
