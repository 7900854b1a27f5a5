"""Loading a RunConfig: YAML files composed through `defaults:`, then `key=value` overrides.

Merge order, later wins: each file's `defaults` (in list order, recursively), the file's own keys,
then the command-line overrides. Every key is checked against the typed schema before OmegaConf
merges it, so a typo fails with the full key path and the keys its section does have.

Commands receive a plain `RunConfig` dataclass instance (`OmegaConf.to_object`): typed attribute
access, cheap to pickle into Ray actors, no OmegaConf at use sites.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

# The checkout holding `configs/` next to the `vla_dist` package: lets `vla-dist collect` find the
# default config when run from any directory.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path("configs/quickstart.yaml")
DEFAULTS_KEY = "defaults"


def find_config_file(path: str | Path | None) -> Path:
    """The config file to load: as given (relative to the cwd), else relative to the checkout."""
    requested = Path(path) if path is not None else DEFAULT_CONFIG
    candidates = [requested]
    if not requested.is_absolute():
        candidates.append(PROJECT_ROOT / requested)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(None, f"config file not found: {requested} (looked in: {looked})")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose the config file at `path` (None: configs/quickstart.yaml) and apply `overrides`."""
    merged = OmegaConf.structured(RunConfig)
    for source, data in _compose(find_config_file(path), stack=()):
        merged = _merge(merged, data, source)
    for override in overrides:
        merged = _merge(merged, _parse_override(override), f"override {override!r}")
    try:
        return typing.cast(RunConfig, OmegaConf.to_object(merged))
    except OmegaConfBaseException as error:  # an unresolvable ${...} interpolation
        raise ConfigError(error.full_key or None, _first_line(error)) from None


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml` atomically (a crash never leaves half a file); return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    # A per-process temp name (not mkstemp: that makes the file 0600) renamed over the target.
    tmp = run_dir / f".config.yaml.{os.getpid()}.tmp"
    header = "# Resolved config of this run; rerun it with: vla-dist <command> --config THIS_FILE\n"
    try:
        tmp.write_text(header + to_yaml(cfg), encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _compose(file: Path, stack: tuple[Path, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(source, data) pairs in merge order: the file's defaults, recursively, then the file itself."""
    resolved = file.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(DEFAULTS_KEY, f"defaults cycle in {file}: {chain}")
    data = _read_yaml(file)
    defaults = data.pop(DEFAULTS_KEY, None) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(DEFAULTS_KEY, f"in {file}: expected a list of YAML paths, got {defaults!r}")
    layers: list[tuple[str, dict[str, Any]]] = []
    for entry in defaults:
        layers += _compose(_find_default(entry, file), (*stack, resolved))
    layers.append((str(file), data))
    return layers


def _find_default(entry: str, listed_in: Path) -> Path:
    """A `defaults` entry is relative to the configs directory holding `listed_in` (else its folder),
    then to the checkout's configs/, so a user's own file can compose the shipped task files."""
    roots = [_configs_root(listed_in), PROJECT_ROOT / "configs"]
    candidates = list(dict.fromkeys(root / entry for root in roots))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(DEFAULTS_KEY, f"{entry!r} listed in {listed_in} not found (looked in: {looked})")


def _configs_root(file: Path) -> Path:
    for parent in file.resolve().parents:
        if parent.name == "configs":
            return parent
    return file.resolve().parent


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        # OmegaConf's loader, not yaml.safe_load: it reads `1e-3` as a float, as users expect.
        loaded = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    except yaml.YAMLError as error:  # its message spans lines: what was expected, where
        raise ConfigError(None, f"cannot parse config file {file}: {' '.join(str(error).split())}") from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as error:
        raise ConfigError(None, f"cannot read config file {file}: {_first_line(error)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(None, f"config file {file} must hold a mapping of sections, got {loaded!r}")
    return typing.cast(dict[str, Any], loaded)


def _parse_override(override: str) -> dict[str, Any]:
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(None, f"malformed override {override!r}: expected KEY=VALUE, e.g. collect.episodes=4")
    try:  # the value is parsed as YAML: 4 -> int, null -> None, [front] -> list
        return typing.cast(dict[str, Any], OmegaConf.to_container(OmegaConf.from_dotlist([override])))
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(key.strip(), f"cannot parse override {override!r}: {_first_line(error)}") from None


def _merge(merged: Any, data: dict[str, Any], source: str) -> Any:
    _check_keys(data, RunConfig, "", source)
    try:
        return OmegaConf.merge(merged, data)
    except OmegaConfBaseException as error:  # a value of the wrong type
        key = error.full_key or None
        if key is None:
            raise ConfigError(None, f"{_first_line(error)} (from {source})") from None
        value = _value_at(data, key)
        got = repr(value) if value is not _MISSING else _first_line(error)
        raise ConfigError(key, f"expected {_type_name(key)}, got {got} (from {source})") from None


def _check_keys(data: dict[str, Any], section: type, prefix: str, source: str) -> None:
    """Reject keys the schema lacks, and sections given a scalar, naming the keys that do exist."""
    hints = typing.get_type_hints(section)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            where = prefix.rstrip(".") or "the config"
            close = difflib.get_close_matches(str(name), list(hints), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(key, f"unknown key{hint} in {source}; {where} has: {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[name]):
            if value is None:  # a section whose keys are all commented out: nothing to merge
                data[name] = value = {}
            if not isinstance(value, dict):
                keys = ", ".join(typing.get_type_hints(hints[name]))
                raise ConfigError(key, f"expected a section with keys ({keys}), got {value!r} (from {source})")
            _check_keys(value, hints[name], f"{key}.", source)


_MISSING = object()


def _value_at(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _type_name(key: str) -> str:
    """The schema's type for `key`, e.g. "int" or "str | None", for error messages."""
    hint: Any = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            break
        hint = typing.get_type_hints(hint).get(part)
    name = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
    return name.replace(" | None", " or null")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
