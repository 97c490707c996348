"""The embedder seam: texts in, unit-length vectors out, plus a fingerprint.

The default embedder is MiniLM (all-MiniLM-L6-v2, run in numpy by
``treesynth.models.minilm``): a sentence embedder independent of the
generator, installed offline with the package. The generator's own hidden
states rated everything alike and rated noise as diverse, so they are only
an option: ``--embedder generator`` is llama.cpp's embedding mode on the
embedded generation model, and ``--embedder FILE.gguf`` the same on any local
GGUF. There an embedding model's GGUF (e.g. a BERT-style sentence embedder)
keeps the pooling its metadata names; a generation model, which names none,
gets mean pooling over its last hidden states. Each text is embedded on its
own, with the context cleared, so a text's vector never depends on which
other texts were embedded with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from treesynth.models.base import ModelError

EMBED_CTX = 512  # tokens; longer texts are cut to this many (llama.cpp's truncate)


class Embedder(Protocol):
    @property
    def fingerprint(self) -> dict[str, Any]: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text, float64."""
        ...


class LlamaCppEmbedder:
    def __init__(self, path: Path, *, threads: int | None = None, n_ctx: int = EMBED_CTX):
        from treesynth.models.base import file_hash
        from treesynth.models.llamacpp import check_gguf

        path = Path(path)
        check_gguf(path)
        import llama_cpp

        threads = threads or max(1, min(os.cpu_count() or 1, 8))
        names = {
            llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
            llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
            llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
        }
        # An embedding model's GGUF names its pooling; a generation model's
        # names none, and gets mean pooling over its last hidden states.
        self.llm = _load(llama_cpp, path, threads, n_ctx, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if self.llm.pooling_type() not in names:
            self.llm.close()
            from llama_cpp._utils import suppress_stdout_stderr

            with suppress_stdout_stderr(disable=False):  # llama.cpp warns that the GGUF names another pooling
                self.llm = _load(llama_cpp, path, threads, n_ctx, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        pooling = names.get(self.llm.pooling_type())
        if pooling is None:
            raise ModelError(f"{path}: llama.cpp gives no pooled embedding for this model")
        self.path = path
        self._fingerprint = {
            "backend": "llama.cpp embeddings",
            "file": path.name,
            "file_hash": file_hash(path),
            "pooling": pooling,
            "n_ctx": n_ctx,
        }

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = [self.llm.embed(text if text else " ", normalize=False, truncate=True) for text in texts]
        return normalise_rows(np.asarray(rows, dtype=np.float64).reshape(len(texts), -1))


def _load(llama_cpp, path: Path, threads: int, n_ctx: int, pooling: int):
    from treesynth.models.llamacpp import _without_extra_buffer_types

    try:
        with _without_extra_buffer_types(llama_cpp.llama_cpp):
            return llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                pooling_type=pooling,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
    except Exception as error:
        raise ModelError(f"cannot load embedding model {path}: {error}") from None


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit length rows; an all-zero row stays zero."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


DEFAULT_EMBEDDER = "minilm"
GENERATOR_EMBEDDER = "generator"


def load_embedder(spec: str | None, *, threads: int | None = None) -> Embedder:
    """``--embedder``: ``minilm`` (the default), ``generator`` (llama.cpp
    embeddings of the embedded generation model) or a local GGUF path."""
    if spec is None or spec == DEFAULT_EMBEDDER:
        from treesynth.models.minilm import load_minilm

        return load_minilm()
    if spec == GENERATOR_EMBEDDER:
        from treesynth.models.embedded import default_model_path

        return LlamaCppEmbedder(default_model_path(), threads=threads)
    return LlamaCppEmbedder(Path(spec).expanduser(), threads=threads)


def describe_embedder(fingerprint: dict[str, Any]) -> str:
    """One line naming an embedder from its fingerprint, whatever its kind."""
    name = fingerprint.get("file") or fingerprint.get("model") or "?"
    details = [str(fingerprint.get("backend", "?"))]
    if "pooling" in fingerprint:
        details.append(f"{fingerprint['pooling']} pooling")
    if "dims" in fingerprint:
        details.append(f"{fingerprint['dims']} dims")
    if "max_tokens" in fingerprint:
        details.append(f"first {fingerprint['max_tokens']} tokens")
    return f"{name} ({', '.join(details)})"
