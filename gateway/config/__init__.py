"""Typed, immutable gateway configuration and its YAML loader."""

from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.model import GatewayConfig, Route

__all__ = ["ConfigError", "GatewayConfig", "Route", "load_config", "load_config_text"]
