"""llama.cpp backend: a local GGUF run in-process, JSON constrained by outlines.

Constraints: outlines' llguidance backend turns a JSON schema into a grammar;
one ``LLMatcher`` per schema is compiled once (well under a millisecond, so
nothing is worth persisting across resumes) and reset per call. The
llguidance tokenizer, built once per model, is the process's cold start.
Each token, the matcher writes its bitmask of allowed
tokens and the sampler looks only at allowed candidates: the few allowed ids
when the mask is sparse, the best raw logits filtered by the mask when it is
dense. Nothing is done over the whole 262k-entry vocabulary that a numpy
threshold cannot skip (``make bench`` shows the measurements behind this).

Determinism: every call clears the KV cache and evaluates its whole prompt,
and sampling (top-k, temperature, top-p) runs here with a numpy RNG seeded by
the request, so an answer depends only on its request and the model, never
on the calls before it. Top-k orders tokens by logit, ties by token id, so
the sparse and dense paths pick the same token."""

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

from treesynth.models.base import TEXT_PATTERN, ModelError, Request, Response
from treesynth.store.keys import canonical_json

GGUF_MAGIC = b"GGUF"
SAMPLER = "treesynth-2:top_k=40 by (logit desc, id asc),temperature,top_p"
TOP_K = 40
# A mask with at most this many non-zero 32-token words is expanded to its ids;
# a denser one filters the best raw logits instead.
SPARSE_WORDS = 256


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
        # Half the cores, as llama-cpp-python does: ggml's threads spin, and with
        # every core taken a busy machine made 2 threads 3-11x slower than 1.
        self.threads = threads or max(1, (os.cpu_count() or 1) // 2)
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
        self._formatter = None  # the chat template, compiled on first use
        self._backend = None  # outlines' llguidance backend, built on first constrained call
        self._matchers: dict[str, Any] = {}
        self._mask_words = np.zeros((self.n_vocab + 31) // 32, dtype="<u4")
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
            if self._formatter is None:  # compiling the Jinja template costs milliseconds: once per model
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                bos = self.llm._model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() != -1 else ""
                eos = self.llm._model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() != -1 else ""
                self._formatter = Jinja2ChatFormatter(template=self._template, eos_token=eos, bos_token=bos)
            return self._formatter(messages=[{"role": r, "content": c} for r, c in messages]).prompt
        return "\n\n".join(content for _, content in messages) + "\n\n"

    def tokenize_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        tokens = self.llm.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)
        bos = self.llm.token_bos()
        if self._add_bos and bos != -1 and (not tokens or tokens[0] != bos):
            tokens = [bos] + tokens
        return tokens

    # -- constraint -----------------------------------------------------------

    def guidance(self):
        """outlines' llguidance backend over this model's vocabulary, built on the
        first constrained call: the process's cold start (the tokenizer's token
        trie and slices: one to two seconds on a 262k vocabulary)."""
        if self._backend is None:
            self._backend = _llguidance_backend(llguidance_tokenizer(self._lib, self._vocab))
        return self._backend

    def matcher(self, schema: dict[str, Any]):
        """A reset LLMatcher for this schema: compiled once per schema, reused."""
        key = canonical_json(schema)
        matcher = self._matchers.get(key)
        if matcher is None:
            import llguidance

            backend = self.guidance()
            if TEXT_PATTERN in schema:  # a plain-text answer that matches a regex (models/base.py)
                processor = backend.get_regex_logits_processor(schema[TEXT_PATTERN])
            else:
                # Compact JSON: a small model otherwise spends its tokens on whitespace.
                compact = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
                processor = backend.get_json_schema_logits_processor(json.dumps(compact))
            matcher = llguidance.LLMatcher(backend.llg_tokenizer, processor.grammar)
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
        words = self._mask_words
        rng = np.random.Generator(np.random.PCG64(request.seed))
        llm, lib, ctx, n_vocab = self.llm, self._lib, self.llm._ctx.ctx, self.n_vocab
        set_up = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        decoding = time.perf_counter()
        eval_seconds = 0.0
        out: list[int] = []
        finish = "length"
        for _ in range(max_tokens):
            if matcher is None:
                ids = top_candidates(logits)
            else:
                if matcher.is_stopped():
                    if matcher.is_error():
                        raise ModelError(f"constraint failed: {matcher.get_error()}")
                    finish = "stop"
                    break
                matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
                ids = allowed_candidates(logits, words)
                if ids.size == 0:
                    raise ModelError(f"constraint allows no token: {matcher.get_error() or 'empty mask'}")
            token = sample_candidates(ids, logits[ids], request.temperature, request.top_p, rng)
            if matcher is not None and not matcher.consume_token(token):
                raise ModelError(f"constraint rejected token {token}: {matcher.get_error()}")
            if lib.llama_vocab_is_eog(self._vocab, token):
                finish = "stop"
                break
            out.append(token)
            if matcher is not None and matcher.is_stopped():  # the answer is complete: no logits needed after it
                finish = "stop"
                break
            if len(out) == max_tokens:  # cut off: the same
                break
            tick = time.perf_counter()
            llm.eval([token])
            # Reading the logits waits for llama.cpp to finish the token: model time too.
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            eval_seconds += time.perf_counter() - tick
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        finished = time.perf_counter()
        return Response(
            text=text,
            completion_tokens=len(out),
            prompt_tokens=len(prompt),
            seconds=finished - started,
            finish_reason=finish,
            # Where the time went: set-up (template, tokens, constraint), the
            # prompt, the decode loop, and llama.cpp's own share of that loop.
            extra={
                "setup_seconds": set_up - started,
                "prompt_seconds": decoding - set_up,
                "decode_seconds": finished - decoding,
                "eval_seconds": eval_seconds,
            },
        )


# -- constraint plumbing -------------------------------------------------------


def llguidance_tokenizer(lib, vocab):
    """``llguidance.llamacpp.lltokenizer_from_vocab`` with the same token bytes,
    read through the C functions directly: its per-token Python wrappers cost
    half of the cold start on a 262k vocabulary."""
    import ctypes

    from llguidance import LLTokenizer

    c = lib.llama_cpp._lib
    control, user_defined = lib.LLAMA_TOKEN_ATTR_CONTROL, lib.LLAMA_TOKEN_ATTR_USER_DEFINED
    size = 256
    buffer = ctypes.create_string_buffer(size)
    tokens: list[bytes] = []
    for token in range(lib.llama_vocab_n_tokens(vocab)):
        n = c.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if n < 0:  # longer than the buffer: -n is its length
            big = ctypes.create_string_buffer(-n)
            n = c.llama_token_to_piece(vocab, token, big, -n, 0, True)
            piece = ctypes.string_at(big, n)
        else:
            piece = ctypes.string_at(buffer, n)
        attr = c.llama_token_get_attr(vocab, token)
        # Control tokens (and user-defined ones that look like them) are marked special, as llguidance expects.
        if attr & control or (attr & user_defined and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    return LLTokenizer.from_llamacpp(
        tokens=tokens,
        vocab_ptr=vocab,
        tokenize_fptr=ctypes.cast(c.llama_tokenize, ctypes.c_void_p).value,
        eos_token=lib.llama_vocab_eos(vocab),
        slices=None,  # the default slices make a mask over a 262k vocabulary cost tens of microseconds, not milliseconds
    )


def _llguidance_backend(tokenizer):
    """outlines' ``LLGuidanceBackend`` (the source of the JSON-schema grammar)
    over a tokenizer built here: its own constructor wraps the model with
    ``outlines.from_llamacpp``, which reads the whole vocabulary a second time."""
    import llguidance
    from outlines.backends.llguidance import LLGuidanceBackend

    backend = LLGuidanceBackend.__new__(LLGuidanceBackend)
    backend.llg = llguidance
    backend.tensor_library_name = "numpy"
    backend.llg_tokenizer = tokenizer
    return backend


# -- sampling --------------------------------------------------------------------

_LANES = np.arange(32)


def top_candidates(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Ascending ids that surely hold the k best logits: every id at or above the
    k-th best logit of a strided subsample (k logits reach it, so none of the k
    best is below it). A compare over the vocabulary instead of a partition."""
    n = logits.shape[0]
    if n <= 8192:
        return np.arange(n)
    threshold = np.partition(logits[:: n // 8192], -k)[-k]
    ids = np.flatnonzero(logits >= threshold)
    return ids if ids.size >= k else np.arange(n)  # NaN logits: no shortcut


def allowed_candidates(logits: np.ndarray, words: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Ascending allowed ids that surely hold the k best allowed logits, from
    llguidance's bitmask (bit i % 32 of 32-bit word i // 32 allows token i)."""
    n = logits.shape[0]
    nonzero = np.flatnonzero(words)
    if nonzero.size <= SPARSE_WORDS:  # few allowed tokens (structure, enums): all of them
        bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 32).view(bool)
        ids = (nonzero[:, None] * 32 + _LANES)[bits]
        return ids[ids < n]
    ids = top_candidates(logits, k)  # most tokens allowed (free text): the best raw logits, filtered
    allowed = ids[((words[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)]
    if allowed.size >= k:  # every allowed id left out is below all of these
        return allowed
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:n])


def sample_candidates(ids: np.ndarray, logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """top-k (by logit, ties by lower id), then temperature, then top-p; the best
    at temperature 0. ``ids`` ascend. One RNG draw per token above temperature 0."""
    if temperature <= 0.0:
        return int(ids[np.argmax(logits)])  # the first of the best: the lowest id among ties
    if logits.size > 8 * TOP_K:  # the k best and their ties, before sorting
        keep = np.flatnonzero(logits >= np.partition(logits, -TOP_K)[-TOP_K])
        ids, logits = ids[keep], logits[keep]
    top = np.argsort(-logits, kind="stable")[:TOP_K]  # stable over ascending ids: ties by lower id
    z = logits[top].astype(np.float64) / temperature
    z -= z[0]
    p = np.exp(z)
    p /= p.sum()
    keep = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, p.size)
    p = p[:keep] / p[:keep].sum()
    return int(ids[top[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), keep - 1)]])


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Sample from a full row of logits."""
    ids = top_candidates(logits)
    return sample_candidates(ids, logits[ids], temperature, top_p, rng)
