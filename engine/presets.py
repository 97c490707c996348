"""Task presets shipped with the package (issue: presets). Placeholder until presets land."""

from __future__ import annotations

from treesynth.engine.config import ConfigError


def load_preset(name: str) -> dict:
    raise ConfigError(f"unknown preset {name!r}")
