"""llama.cpp backend: a local GGUF run in-process, JSON constrained by outlines.

Constraints: outlines' llguidance backend turns a JSON schema into a grammar;
one ``LLMatcher`` per schema is compiled once and reset per call, and its
token bitmask is applied to llama.cpp's logits in our own decode loop.

Determinism: every call clears the KV cache and evaluates its whole prompt,
and sampling (top-k, temperature, top-p) runs here with a numpy RNG seeded by
the request, so an answer depends only on its request and the model, never
on the calls before it."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xxhash

from treesynth.models.base import ModelError, Request, Response
from treesynth.store.keys import canonical_json

GGUF_MAGIC = b"GGUF"
SAMPLER = "treesynth-1:top_k=40,temperature,top_p"
TOP_K = 40


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "xxh3:" + h.hexdigest()


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise ModelError(f"cannot read model file {path}: {error.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF model file")


@contextmanager
def _without_extra_buffer_types(bindings):
    """Load weights without llama.cpp's extra CPU buffer types (AMX, repacking).

    A native build on a CPU that reports AMX compiles the AMX matmul, which
    segfaulted on every prompt longer than one token on the virtual machines
    we run on (the kernel does not grant AMX tile state). ``Llama()`` does not
    expose ``use_extra_bufts``, so its default parameters are patched for the
    duration of the load."""
    original = bindings.llama_model_default_params

    def params():
        value = original()
        value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


class LlamaCppModel:
    def __init__(self, path: Path, *, n_ctx: int = 4096, threads: int | None = None):
        path = Path(path)
        check_gguf(path)
        try:
            import llama_cpp
        except ImportError as error:  # pragma: no cover - a broken install
            raise ModelError(f"llama-cpp-python is not importable: {error}") from None
        self._lib = llama_cpp
        self.path = path
        self.threads = threads or max(1, min(os.cpu_count() or 1, 8))
        try:
            with _without_extra_buffer_types(llama_cpp.llama_cpp):
                self.llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    n_batch=512,
                    seed=0,
                    verbose=False,
                )
        except Exception as error:
            raise ModelError(f"cannot load model {path}: {error}") from None
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._template = self.llm.metadata.get("tokenizer.chat_template")
        self._backend = None  # outlines' llguidance backend, built on first constrained call
        self._matchers: dict[str, Any] = {}
        self._fingerprint = {
            "backend": "llama.cpp",
            "llama_cpp_python": metadata.version("llama-cpp-python"),
            "constraint": f"outlines {metadata.version('outlines')} + llguidance {metadata.version('llguidance')}",
            "file": path.name,
            "file_hash": file_hash(path),
            "quantisation": self.llm.metadata.get("general.file_type", "unknown"),
            "n_ctx": self.n_ctx,
            "sampler": SAMPLER,
            "extra_buffer_types": False,
        }

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    # -- prompt -------------------------------------------------------------

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The chat template from the GGUF; a plain layout for base models without one."""
        if self._template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            bos = self.llm._model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() != -1 else ""
            eos = self.llm._model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() != -1 else ""
            formatter = Jinja2ChatFormatter(template=self._template, eos_token=eos, bos_token=bos)
            return formatter(messages=[{"role": r, "content": c} for r, c in messages]).prompt
        return "\n\n".join(content for _, content in messages) + "\n\n"

    def tokenize_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        tokens = self.llm.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)
        bos = self.llm.token_bos()
        if self._add_bos and bos != -1 and (not tokens or tokens[0] != bos):
            tokens = [bos] + tokens
        return tokens

    # -- constraint -----------------------------------------------------------

    def matcher(self, schema: dict[str, Any]):
        """A reset LLMatcher for this schema: compiled once per schema, reused."""
        key = canonical_json(schema)
        matcher = self._matchers.get(key)
        if matcher is None:
            if self._backend is None:
                import outlines
                from outlines.backends.llguidance import LLGuidanceBackend

                self._backend = LLGuidanceBackend(outlines.from_llamacpp(self.llm))
            import llguidance

            # Compact JSON: a small model otherwise spends its tokens on whitespace.
            compact = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
            processor = self._backend.get_json_schema_logits_processor(json.dumps(compact))
            matcher = llguidance.LLMatcher(processor.llg_tokenizer, processor.grammar)
            if matcher.is_error():
                raise ModelError(f"schema could not be compiled: {matcher.get_error()}")
            self._matchers[key] = matcher
        else:
            matcher.reset()
        return matcher

    # -- generation -------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: Request) -> Response:
        started = time.perf_counter()
        prompt = self.tokenize_prompt(request.messages)
        budget = self.n_ctx - len(prompt)
        if budget <= 0:
            raise ModelError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        max_tokens = min(request.max_tokens, budget)
        matcher = self.matcher(request.schema) if request.schema is not None else None
        mask_words = np.empty((self.n_vocab + 31) // 32, dtype=np.int32)
        rng = np.random.Generator(np.random.PCG64(request.seed))
        llm, lib = self.llm, self._lib
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        finish = "length"
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(self.n_vocab,))
            if matcher is not None:
                if matcher.is_stopped():
                    finish = "stop"
                    break
                matcher.unsafe_compute_mask_ptr(mask_words.ctypes.data, mask_words.nbytes)
                allowed = np.unpackbits(mask_words.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)
                logits = np.where(allowed, logits, -np.inf)
            token = sample(logits, request.temperature, request.top_p, rng)
            if matcher is not None:
                if not matcher.consume_token(token):
                    raise ModelError(f"constraint rejected token {token}: {matcher.get_error()}")
            if lib.llama_vocab_is_eog(self._vocab, token):
                finish = "stop"
                break
            out.append(token)
            llm.eval([token])
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        return Response(
            text=text,
            completion_tokens=len(out),
            prompt_tokens=len(prompt),
            seconds=time.perf_counter() - started,
            finish_reason=finish,
        )


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """top-k, then temperature, then top-p; argmax at temperature 0. One RNG draw per token."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    k = min(TOP_K, logits.shape[0])
    top = np.argpartition(logits, -k)[-k:]
    top = top[np.lexsort((top, -logits[top]))]  # by logit, ties by token id: a stable order
    z = logits[top].astype(np.float64) / temperature
    z -= z[0]
    p = np.exp(z)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    p = p[:keep] / p[:keep].sum()
    return int(top[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), keep - 1)])
