"""Build a model from the ``--model`` value: a GGUF path, the embedded default
when none is given, or ``fake:`` (the deterministic test model); or from the
``--server`` options: OpenAI-compatible servers (models/server.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from treesynth.models.base import Model, ModelError


@dataclass(frozen=True)
class ServerOptions:
    """The ``--server`` family of options, as given (None: not given)."""

    urls: tuple[str, ...] = ()
    model: str | None = None
    parallel: int | None = None
    api_key_env: str | None = None
    wait: float | None = None

    def others_given(self) -> bool:
        return any(v is not None for v in (self.model, self.parallel, self.api_key_env, self.wait))


def load_server(options: ServerOptions) -> Model:
    """A ServerModel over the given URLs; the API key comes from the named
    environment variable and goes nowhere but the Authorization header."""
    from treesynth.models.server import DEFAULT_WAIT, ServerModel

    if options.parallel is not None and options.parallel < 1:
        raise ModelError(f"--server-parallel must be at least 1, not {options.parallel}")
    if options.wait is not None and options.wait < 0:
        raise ModelError(f"--server-wait must be at least 0 seconds, not {options.wait:g}")
    api_key = None
    if options.api_key_env is not None:
        api_key = os.environ.get(options.api_key_env)
        if not api_key:
            raise ModelError(f"--api-key-env {options.api_key_env}: the environment variable {options.api_key_env} is not set or empty")
    return ServerModel(
        options.urls,
        model=options.model,
        parallel=options.parallel,
        api_key=api_key,
        wait=DEFAULT_WAIT if options.wait is None else options.wait,
    )


def load_model(
    spec: str | None,
    *,
    threads: int | None = None,
    n_ctx: int = 4096,
    server: ServerOptions | None = None,
    parallel: int | None = None,
    gpu_layers: int | None = None,
    warn=None,
) -> Model:
    """``parallel``: sequences a local model decodes at once (default:
    ``default_parallel``: 1 for a model other than the embedded one);
    ``gpu_layers``: layers offloaded to a GPU (default: all where llama.cpp
    has a GPU backend); ``warn``: called with a warning line."""
    if server is not None and server.urls:
        if spec:
            raise ModelError("give --model (a local GGUF) or --server (a model server), not both")
        if parallel is not None or gpu_layers is not None:
            raise ModelError("--parallel and --gpu-layers are for a local model; a server's concurrency is --server-parallel")
        return load_server(server)
    if server is not None and server.others_given():
        raise ModelError("--server-model, --server-parallel, --server-wait and --api-key-env go with --server URL")
    if parallel is not None and parallel < 1:
        raise ModelError(f"--parallel must be at least 1, not {parallel}")
    if spec and spec.startswith("fake:"):
        from treesynth.models.fake import FakeModel

        options = dict(part.split("=", 1) for part in spec[5:].split(",") if "=" in part)
        try:
            return FakeModel(
                delay=float(options.get("delay", 0)),
                variant=int(options.get("variant", 0)),
                call_log=options.get("log"),
                parallel=parallel or 1,
                fail_after=int(options["fail"]) if "fail" in options else None,
            )
        except ValueError:
            raise ModelError(f"bad fake model options: {spec!r}") from None
    from treesynth.models.embedded import default_model_path
    from treesynth.models.llamacpp import UNCHECKED_PARALLEL, LlamaCppModel, default_parallel

    path = Path(spec).expanduser() if spec else default_model_path()
    embedded = not spec or path.resolve() == default_model_path().resolve()
    if parallel and parallel > 1 and not embedded and warn is not None:
        warn(UNCHECKED_PARALLEL.format(parallel=parallel, name=path.name))
    return LlamaCppModel(
        path,
        n_ctx=n_ctx,
        threads=threads,
        parallel=parallel or default_parallel(gpu_layers, embedded),
        gpu_layers=gpu_layers,
        reuse_prefix=embedded,  # another model's prompt is always split the same way
    )
