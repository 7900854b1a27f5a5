"""Typed run configuration: schema, loading with composition and overrides, validation."""

from vla_dist.config.load import find_config_file, load_config, save_resolved, to_yaml
from vla_dist.config.schema import RunConfig
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError

__all__ = [
    "ConfigError",
    "RunConfig",
    "find_config_file",
    "load_config",
    "save_resolved",
    "to_yaml",
    "validate",
]
