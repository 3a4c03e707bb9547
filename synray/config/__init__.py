"""Typed, validated job configs: YAML in ``conf/`` plus dotted command-line overrides."""

from synray.config.base import (
    ConfigError,
    OutputConfig,
    RayConfig,
    StrictModel,
    TrackingConfig,
    apply_overrides,
    config_hash,
    load_config,
    redact,
    to_yaml,
)

__all__ = [
    "ConfigError",
    "OutputConfig",
    "RayConfig",
    "StrictModel",
    "TrackingConfig",
    "apply_overrides",
    "config_hash",
    "load_config",
    "redact",
    "to_yaml",
]
