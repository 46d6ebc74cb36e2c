"""YAML configs, command-line overrides and ``_component_`` instantiation."""

from kdtune.config.entry import parse
from kdtune.config.instantiate import instantiate, resolve_component, validate
from kdtune.config.loading import apply_overrides, load_config, save_config

__all__ = [
    "apply_overrides",
    "instantiate",
    "load_config",
    "parse",
    "resolve_component",
    "save_config",
    "validate",
]
