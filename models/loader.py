"""Build a model from the ``--model`` value: a GGUF path, the embedded default
when none is given, or ``fake:`` (the deterministic test model)."""

from __future__ import annotations

from pathlib import Path

from treesynth.models.base import Model, ModelError


def load_model(spec: str | None, *, threads: int | None = None, n_ctx: int = 4096) -> Model:
    if spec and spec.startswith("fake:"):
        from treesynth.models.fake import FakeModel

        options = dict(part.split("=", 1) for part in spec[5:].split(",") if "=" in part)
        try:
            return FakeModel(
                delay=float(options.get("delay", 0)),
                variant=int(options.get("variant", 0)),
                call_log=options.get("log"),
            )
        except ValueError:
            raise ModelError(f"bad fake model options: {spec!r}") from None
    from treesynth.models.embedded import default_model_path
    from treesynth.models.llamacpp import LlamaCppModel

    path = Path(spec).expanduser() if spec else default_model_path()
    return LlamaCppModel(path, n_ctx=n_ctx, threads=threads)
