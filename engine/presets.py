"""Task presets shipped with the package: engine/presets/NAME.toml, one per
domain of the paper (GSM8K, MATH, Code Alpaca, SimpleToM).

A preset is an ordinary task file: ``treesynth preset show NAME`` prints it,
and the printed file runs unchanged with ``--spec``. Its first comment line
(``# NAME: summary``) is the one-line summary ``treesynth presets`` lists."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from treesynth.engine.config import ConfigError, load_task_file, parse_task_text

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _folder():
    return resources.files("treesynth.engine").joinpath("presets")


def preset_names() -> list[str]:
    return sorted(entry.name[: -len(".toml")] for entry in _folder().iterdir() if entry.name.endswith(".toml"))


def preset_text(name: str) -> str:
    """The preset's TOML file as shipped, comments included."""
    names = preset_names()
    if not _NAME.match(name) or name not in names:
        raise ConfigError(f"unknown preset {name!r}; the presets are: {', '.join(names)}")
    return _folder().joinpath(f"{name}.toml").read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    """The preset as a task dict, the same as its file would give with --spec."""
    return parse_task_text(preset_text(name), f"preset {name}")


def preset_summary(name: str) -> str:
    first = preset_text(name).splitlines()[0]
    return first.removeprefix("#").strip().removeprefix(f"{name}:").strip()


def load_task(description: str | None, spec: Path | None, preset: str | None, missing: str) -> dict[str, Any]:
    """The task dict from a task file or a preset (at most one), with the
    description given on the command line in place of theirs."""
    if spec and preset:
        raise ConfigError("give --spec or --preset, not both")
    task = load_preset(preset) if preset else load_task_file(spec) if spec else {}
    if description is not None:
        task["description"] = description
    if "description" not in task:
        raise ConfigError(missing)
    return task
