"""Loading a RunConfig: YAML files composed through `defaults:`, then `key=value` overrides.

Merge order, later wins: the model preset (configs/model/<model.preset>.yaml), each file's
`defaults` (in list order, recursively), the file's own keys, then the command-line overrides. Every
key is checked against the typed schema before OmegaConf merges it, so a typo fails with the full key
path and the keys its section does have.

Commands receive a plain `RunConfig` dataclass instance (`OmegaConf.to_object`): typed attribute
access, cheap to pickle into Ray actors, no OmegaConf at use sites.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vla_dist import atomic
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError, error_line

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
    """Compose the config file at `path` (None: configs/quickstart.yaml) and apply `overrides`.

    The model preset (`model.preset`, from the files or an override; default tiny-pi0) is merged
    first, under everything else: configs/model/<preset>.yaml is the base of the `model` section."""
    config_file = find_config_file(path)
    layers = _compose(config_file, stack=())
    layers += [(f"override {override!r}", _parse_override(override)) for override in overrides]
    merged = OmegaConf.structured(RunConfig)
    preset_name = _preset_name(layers, default=merged.model.preset)
    preset_file = find_preset(preset_name, config_file)
    merged = _merge(merged, _read_preset(preset_file), str(preset_file))
    for source, data in layers:
        merged = _merge(merged, data, source)
    try:
        cfg = typing.cast(RunConfig, OmegaConf.to_object(merged))
    except OmegaConfBaseException as error:  # an unresolvable ${...} interpolation
        raise ConfigError(error.full_key or None, error_line(error)) from None
    if cfg.model.pretrained is not None:
        _apply_pretrained(cfg, _model_keys_given(layers))
    return cfg


def available_presets(config_file: Path | None = None) -> list[str]:
    """Preset names: configs/model/*.yaml beside `config_file`'s configs directory and in the checkout."""
    names = {p.stem for root in _preset_roots(config_file) if root.is_dir() for p in root.glob("*.yaml")}
    return sorted(names)


def find_preset(name: str, config_file: Path | None = None) -> Path:
    """configs/model/<name>.yaml (beside the config file's configs directory, then the checkout's)."""
    if name and "/" not in name and "\\" not in name and not name.startswith("."):
        for root in _preset_roots(config_file):
            if (root / f"{name}.yaml").is_file():
                return root / f"{name}.yaml"
    available = ", ".join(available_presets(config_file)) or "none"
    raise ConfigError("model.preset", f"unknown preset {name!r}; available: {available} (configs/model/*.yaml)")


def _preset_roots(config_file: Path | None) -> list[Path]:
    roots = [_configs_root(config_file) / "model"] if config_file is not None else []
    return list(dict.fromkeys([*roots, PROJECT_ROOT / "configs" / "model"]))


def _preset_name(layers: list[tuple[str, dict[str, Any]]], default: str) -> str:
    """The last `model.preset` the files and overrides give (later layers win), else `default`."""
    name = default
    for source, data in layers:
        model = data.get("model")
        if isinstance(model, dict) and "preset" in model:
            if not isinstance(model["preset"], str):
                raise ConfigError("model.preset", f"expected a preset name, got {model['preset']!r} (from {source})")
            name = model["preset"]
    return name


def _read_preset(file: Path) -> dict[str, Any]:
    data = _read_yaml(file)
    if set(data) != {"model"} or not isinstance(data["model"], dict):
        raise ConfigError("model.preset", f"preset file {file} must hold exactly one mapping, `model:`")
    data["model"].pop("preset", None)  # the name is the file's; a stale copy inside must not win
    return data


def _model_keys_given(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """{model key: source} for the model keys the files and overrides (not the preset) set."""
    given: dict[str, str] = {}
    for source, data in layers:
        model = data.get("model")
        if isinstance(model, dict):
            given.update({key: source for key, value in model.items() if not (key == "hf" and not value)})
    return given


# With model.pretrained, these come from the saved policy, not from the preset.
_PRETRAINED_KEYS = ("family", "chunk_size", "image_size", "max_text_tokens")


def _apply_pretrained(cfg: RunConfig, given: dict[str, str]) -> None:
    """Check model.pretrained (layout, then weights against its config.json, which imports
    transformers) and take its architecture; a conflicting key the user set is an error."""
    from vla_dist.models.files import (
        PretrainedError,
        check_model_source,
        check_weights_match,
        foundation_architecture,
    )

    path = cfg.model.pretrained
    try:
        spec = check_model_source(path)
        check_weights_match(path)
        if spec.get("foundation"):  # a plain transformers checkpoint: the prompt length stays ours
            spec.update(foundation_architecture(path), max_text_tokens=cfg.model.max_text_tokens)
            spec.setdefault("chunk_size", cfg.model.chunk_size)  # a VLM backbone: the preset's or the user's
    except PretrainedError as error:
        raise ConfigError("model.pretrained", str(error)) from None
    if "hf" in given:
        raise ConfigError("model.hf", f"cannot be set with model.pretrained (from {given['hf']}): the architecture "
                          f"is {path}/config.json")
    for key in _PRETRAINED_KEYS:
        if key in given and getattr(cfg.model, key) != spec[key]:
            raise ConfigError(f"model.{key}", f"{getattr(cfg.model, key)!r} (from {given[key]}) disagrees with "
                              f"model.pretrained {path}: {spec[key]!r}")
        setattr(cfg.model, key, spec[key])
    cfg.model.hf = {}


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml` atomically (a crash never leaves half a file); return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    header = "# Resolved config of this run; rerun it with: vla-dist <command> --config THIS_FILE\n"
    return atomic.write_text(run_dir / "config.yaml", header + to_yaml(cfg))


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
        raise ConfigError(None, f"cannot read config file {file}: {error_line(error)}") from None
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
        raise ConfigError(key.strip(), f"cannot parse override {override!r}: {error_line(error)}") from None


def _merge(merged: Any, data: dict[str, Any], source: str) -> Any:
    _check_keys(data, RunConfig, "", source)
    try:
        return OmegaConf.merge(merged, data)
    except OmegaConfBaseException as error:  # a value of the wrong type
        key = error.full_key or None
        if key is None:
            raise ConfigError(None, f"{error_line(error)} (from {source})") from None
        value = _value_at(data, key)
        got = repr(value) if value is not _MISSING else error_line(error)
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


