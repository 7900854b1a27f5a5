"""Task names, importable without Genesis: defined in `vla_dist.spaces` (with their instructions);
this older path stays importable."""

from vla_dist.spaces import TASK_NAMES

__all__ = ["TASK_NAMES"]
