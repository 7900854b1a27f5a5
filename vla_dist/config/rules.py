"""The builders of config checks: each returns a `Check` (a function of the RunConfig that raises
ConfigError naming the full key, the bad value and what is allowed). validate.py and rl_checks.py
compose their rules from these."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

Check = Callable[[RunConfig], None]


def value_at(cfg: RunConfig, key: str) -> Any:
    """`value_at(cfg, "collect.episodes")` is `cfg.collect.episodes`."""
    return functools.reduce(getattr, key.split("."), cfg)


def at_least(key: str, low: float, *, optional: bool = False) -> Check:
    def check(cfg: RunConfig) -> None:
        value = value_at(cfg, key)
        if optional and value is None:
            return
        if value < low:
            allowed = f"null or >= {low}" if optional else f">= {low}"
            raise ConfigError(key, f"must be {allowed}, got {value!r}")

    return check


def greater_than(key: str, low: float) -> Check:
    def check(cfg: RunConfig) -> None:
        if not value_at(cfg, key) > low:
            raise ConfigError(key, f"must be > {low}, got {value_at(cfg, key)!r}")

    return check


def in_range(key: str, low: float, high: float) -> Check:
    def check(cfg: RunConfig) -> None:
        value = value_at(cfg, key)
        if not low <= value <= high:
            raise ConfigError(key, f"must be in {low}..{high}, got {value!r}")

    return check


def one_of(key: str, allowed: Sequence[str]) -> Check:
    def check(cfg: RunConfig) -> None:
        value = value_at(cfg, key)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")

    return check


def output_dir(key: str, optional: bool = False, expanduser: bool = False) -> Check:
    """A directory we will create/write: non-empty, and neither it nor any existing directory above it
    is a file (`/dev/null/x` cannot be created). Only the filesystem as it is now: a directory we may
    not create (permissions, a read-only mount) is a runtime failure when it is created."""

    def check(cfg: RunConfig) -> None:
        value = value_at(cfg, key)
        if value is None and optional:
            return
        if not value.strip():
            raise ConfigError(key, "must be a directory path, got an empty string")
        path = Path(value).expanduser() if expanduser else Path(value)
        if path.is_file():
            raise ConfigError(key, f"{value!r} is an existing file; expected a directory path")
        for above in (path, *path.parents):
            # os.path: False (not an exception) for a path we may not look at; the mkdir then reports it
            if os.path.isdir(above):
                return  # the nearest existing directory: everything below it can be created
            if os.path.lexists(above):
                raise ConfigError(key, f"{value!r} lies under {str(above)!r}, which is not a directory")

    return check
