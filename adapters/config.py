"""Where the registry and cache live: flag, else environment, else config file, else default.

This is an edge module: the CLI and the server's settings call it; nothing below reads the
environment. ``LORAPLEX_HOME`` (default ``~/.loraplex``) holds ``config.yaml``, the default folder
registry ``registry/`` and the cache ``cache/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    registry: str  # storage URI
    cache: Path


def load_settings(registry: str | None = None, cache: str | None = None, env: Mapping[str, str] | None = None) -> RegistrySettings:
    env = os.environ if env is None else env
    home = Path(env.get("LORAPLEX_HOME") or Path.home() / ".loraplex").expanduser()
    file_cfg = _read_config(Path(env["LORAPLEX_CONFIG"]) if env.get("LORAPLEX_CONFIG") else home / "config.yaml")
    registry = registry or env.get("LORAPLEX_REGISTRY") or file_cfg.get("registry") or (home / "registry").as_uri()
    cache_dir = cache or env.get("LORAPLEX_CACHE") or file_cfg.get("cache") or home / "cache"
    return RegistrySettings(registry=str(registry), cache=Path(cache_dir).expanduser())


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is unreadable: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    unknown = set(data) - {"registry", "cache"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    for key in ("registry", "cache"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config file {path}: {key} must be a string")
    return data
