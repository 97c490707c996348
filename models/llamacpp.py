"""llama.cpp backend: a local GGUF run in-process, JSON constrained by outlines.

Constraints: outlines' llguidance backend turns a JSON schema into a grammar,
compiled once per schema (a free-text string may not end in whitespace or
open punctuation: ``ended_strings``); each sequence in flight has its own ``LLMatcher``
over it (kept for reuse when the sequence ends). The llguidance tokenizer,
built once per model, is the process's cold start. Each token, the matcher
writes its bitmask of allowed tokens and the sampler looks only at allowed
candidates: the few allowed ids when the mask is sparse, the best raw logits
filtered by the mask when it is dense. A live sequence's next mask depends
only on the tokens it has taken, so with a large vocabulary it is computed on
a second thread while llama.cpp evaluates the step that gives the logits it
will filter (see MASK_AHEAD_VOCAB). Nothing is done over the whole
262k-entry vocabulary that a numpy threshold cannot skip (``make bench``
shows the measurements behind this).

Batching: ``parallel`` requests decode at once in one llama.cpp context, one
KV stream per sequence; see ``LlamaCppModel``.

Determinism: every sequence clears its KV stream and evaluates its whole
prompt alone, and sampling (top-k, temperature, top-p) runs here with a numpy
RNG seeded by the request, so an answer depends only on its request and the
model, never on the calls before it or beside it. Top-k orders tokens by
logit, ties by token id, so the sparse and dense paths pick the same token."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from treesynth.models.base import TEXT_PATTERN, ModelError, Request, Response, file_hash
from treesynth.store.keys import canonical_json

GGUF_MAGIC = b"GGUF"
SAMPLER = "treesynth-2:top_k=40 by (logit desc, id asc),temperature,top_p"
TOP_K = 40
# A mask with at most this many non-zero 32-token words is expanded to its ids;
# a denser one filters the best raw logits instead.
SPARSE_WORDS = 256
# Prompt tokens per llama_decode: fixed, since the chunking of a prompt decides
# which kernel runs (with flash attention on, chunks under 64 rows took another
# CPU kernel and moved logits by 0.6-0.8).
PROMPT_CHUNK = 256
# A prompt starts from another's KV when they share at least this many leading tokens.
MIN_SHARED_PREFIX = 16
# A free-text string field may not end in these: a small model writes a bare
# `"` where it means to open a quotation, and JSON reads it as the end of the
# string, leaving "...the problem is " (measured: 3 of 16 GSM8K samples of the
# embedded model). With the end constrained, the model goes on writing instead.
STRING_END = r"[^\s:,;(\[{]"
# Vocabularies from this size get their masks computed during llama_decode, on
# a second thread. Gemma 3 (262k tokens): a mask of free text took 2.8 ms a
# sequence a step on the main thread, and at 16 sequences constrained/raw rose
# from 0.70 to 0.91 (pivots) and from 0.75 to 1.06 (leaf). SmolLM2 (49k): no
# gain at 1 or 16 sequences, 8% slower at 8, and the bench's end-to-end run at
# --parallel 8 took 158 s against 150 s (176 s against 164 s in another pair):
# its masks stay on the main thread. Speed only: the same masks either way.
MASK_AHEAD_VOCAB = 131072
# Sequences decoded at once unless --parallel says otherwise (measured: README, `make bench`).
DEFAULT_PARALLEL = 8
# With layers on a GPU, the most sequences whose tokens did not depend on their
# neighbours: on an H200 (CUDA 13, this llama.cpp) a sequence decoded the same
# alone and among 1 or 3 others, and differently among 7, 8, 11 or 15.
GPU_PARALLEL = 4


def default_parallel(gpu_layers: int | None, embedded: bool = True) -> int:
    """DEFAULT_PARALLEL on a CPU; GPU_PARALLEL where layers go to a GPU; 1 for
    a model other than the embedded one, whose kernels nobody has checked to
    be batch-invariant (Gemma 3 270M Q4_K_M is not: among 7 neighbours a
    sequence decoded differently on the CPU, among 1 the same)."""
    import llama_cpp

    if not embedded:
        return 1
    offload = bool(llama_cpp.llama_supports_gpu_offload()) and gpu_layers != 0
    return GPU_PARALLEL if offload else DEFAULT_PARALLEL


UNCHECKED_PARALLEL = (
    "--parallel {parallel} on {name}: a rerun or a resumed run gives the same bytes only if this model's kernels "
    "are batch-invariant, which was measured for the embedded SmolLM2 only (Gemma 3 270M Q4_K_M was not); "
    "--parallel 1 is always exact"
)


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
    """A GGUF in this process. ``parallel`` sequences decode at once in one
    context: one KV stream per sequence (``kv_unified`` off), one
    ``llama_decode`` per step advancing every live sequence by one token,
    each sequence with its own constraint matcher and its own seeded RNG.
    A prompt is evaluated alone, in chunks of ``PROMPT_CHUNK`` tokens, never
    together with another request's tokens; with flash attention off, a
    sequence's logits are then the same alone or among any neighbours
    (tests/test_batching.py checks this on every upgrade), so ``parallel``
    changes speed, never content, and is not in the fingerprint."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        parallel: int = 1,
        gpu_layers: int | None = None,
        kv_limit: int | None = None,
        reuse_prefix: bool = True,
    ):
        path = Path(path)
        check_gguf(path)
        try:
            import llama_cpp
        except ImportError as error:  # pragma: no cover - a broken install
            raise ModelError(f"llama-cpp-python is not importable: {error}") from None
        self._lib = llama_cpp
        self.path = path
        if parallel < 1:
            raise ModelError(f"--parallel must be at least 1, not {parallel}")
        most = llama_cpp.llama_max_parallel_sequences()
        if parallel > most:
            raise ModelError(f"--parallel {parallel} is more than llama.cpp's limit of {most} sequences in one context")
        self.parallel = parallel
        # Start a prompt from KV another prompt left: splits the rest of the
        # prompt differently, so only for models whose logits do not depend on
        # the split (measured for the embedded model; see default_parallel).
        self.reuse_prefix = reuse_prefix
        # Half the cores, as llama-cpp-python does: ggml's threads spin, and with
        # every core taken a busy machine made 2 threads 3-11x slower than 1.
        self.threads = threads or max(1, (os.cpu_count() or 1) // 2)
        self.gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers is not None and gpu_layers < -1:
            raise ModelError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, not {gpu_layers}")
        if gpu_layers and not self.gpu:
            raise ModelError(
                f"--gpu-layers {gpu_layers}: this llama-cpp-python was built without a GPU backend "
                "(reinstall it with `make setup GPU=cuda`, see the README)"
            )
        wanted_layers = (-1 if self.gpu else 0) if gpu_layers is None else gpu_layers
        if wanted_layers and parallel > GPU_PARALLEL:
            raise ModelError(
                f"--parallel {parallel} with layers on the GPU: above {GPU_PARALLEL} sequences, GPU kernels gave a "
                "sequence other tokens depending on its neighbours (measured), so a rerun or a resumed run could differ; "
                f"use --parallel {GPU_PARALLEL} or less, or --gpu-layers 0"
            )
        try:
            with _without_extra_buffer_types(llama_cpp.llama_cpp):
                # The weights, the vocabulary and the chat template; decoding runs
                # in a context of our own (below), so this one's is small.
                self.llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=256,
                    n_batch=256,
                    n_gpu_layers=wanted_layers,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    seed=0,
                    verbose=False,
                )
        except Exception as error:
            raise ModelError(f"cannot load model {path}: {error}") from None
        self._model = self.llm.model
        n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.gpu_layers = 0 if not self.gpu else (n_layer if wanted_layers < 0 else min(wanted_layers, n_layer))
        self.kv_bytes_per_token = kv_bytes_per_token(llama_cpp, self._model, self.llm.metadata)
        need = self.kv_bytes_per_token * n_ctx * parallel
        limit = kv_limit if kv_limit is not None else (None if self.gpu_layers else memory_available() // 2)
        if limit is not None and need > limit:
            raise ModelError(
                f"--parallel {parallel} with --n-ctx {n_ctx} needs {_gib(need)} of KV cache "
                f"({_gib(self.kv_bytes_per_token * n_ctx)} per sequence); the limit is {_gib(limit)} "
                "(half the free memory): lower --parallel or --n-ctx"
            )
        self._ctx = self._new_context(n_ctx)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._template = self.llm.metadata.get("tokenizer.chat_template")
        self._formatter = None  # the chat template, compiled on first use
        self._backend = None  # outlines' llguidance backend, built on first constrained call
        self._grammars: dict[str, Any] = {}  # schema -> compiled grammar
        self._idle_matchers: dict[str, list[Any]] = {}  # schema -> matchers not in use
        self._masker: ThreadPoolExecutor | None = None  # computes next masks during llama_decode
        self.masks_ahead = self.n_vocab >= MASK_AHEAD_VOCAB
        self._held: list[list[int]] = [[] for _ in range(parallel)]  # per slot: the prompt whose KV it holds
        self._last_used = [-1] * parallel  # per slot: when it last took a prompt (-1: never)
        self._prompts_taken = 0
        self.prefix_tokens_reused = 0
        capacity = max(PROMPT_CHUNK, parallel)
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._batch_token = np.ctypeslib.as_array(self._batch.token, shape=(capacity,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(capacity,))
        self._batch_logits = np.ctypeslib.as_array(self._batch.logits, shape=(capacity,))
        self._batch_seq = [self._batch.seq_id[i] for i in range(capacity)]
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(capacity,))[:] = 1
        self._fingerprint = {
            "backend": "llama.cpp",
            "llama_cpp_python": metadata.version("llama-cpp-python"),
            "constraint": f"outlines {metadata.version('outlines')} + llguidance {metadata.version('llguidance')}",
            "file": path.name,
            "file_hash": file_hash(path),
            "quantisation": self.llm.metadata.get("general.file_type", "unknown"),
            "n_ctx": self.n_ctx,
            "sampler": SAMPLER,
            "string_end": STRING_END,
            "extra_buffer_types": False,
            # What decides the kernels, hence the logits: each sequence its own
            # KV stream, flash attention off, prompts in fixed chunks, and where
            # the layers run (GPU kernels give other logits than CPU ones).
            "kv": "per-sequence",
            "flash_attn": False,
            "prompt_chunk": PROMPT_CHUNK,
            "prompt_prefix_reuse": MIN_SHARED_PREFIX if reuse_prefix else 0,
            "offload": f"{self.gpu_layers}/{n_layer} layers on GPU" if self.gpu_layers else "cpu",
        }

    def _new_context(self, n_ctx: int):
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * self.parallel
        params.n_seq_max = self.parallel
        params.kv_unified = False
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_batch = params.n_ubatch = max(PROMPT_CHUNK, self.parallel)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not make a context of {self.parallel} x {n_ctx} tokens "
                f"({_gib(self.kv_bytes_per_token * n_ctx * self.parallel)} of KV cache): lower --parallel or --n-ctx"
            )
        return ctx

    def close(self) -> None:
        if self._masker is not None:
            self._masker.shutdown()
            self._masker = None
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
            self.llm.close()

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    # -- prompt -------------------------------------------------------------

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The chat template from the GGUF; a plain layout for base models without one."""
        if self._template:
            if self._formatter is None:  # compiling the Jinja template costs milliseconds: once per model
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                bos = self._token_text(self.llm.token_bos())
                eos = self._token_text(self.llm.token_eos())
                self._formatter = Jinja2ChatFormatter(template=self._template, eos_token=eos, bos_token=bos)
            return self._formatter(messages=[{"role": r, "content": c} for r, c in messages]).prompt
        return "\n\n".join(content for _, content in messages) + "\n\n"

    def _token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8") if token != -1 else ""

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
        """A fresh LLMatcher for this schema, taken from the schema's idle ones
        (reset) or made from its grammar, compiled once per schema. Give it back
        with ``release`` when its sequence ends."""
        import llguidance

        key = canonical_json(schema)
        idle = self._idle_matchers.setdefault(key, [])
        if idle:
            matcher = idle.pop()
            matcher.reset()
            return matcher
        grammar = self._grammars.get(key)
        if grammar is None:
            backend = self.guidance()
            if TEXT_PATTERN in schema:  # a plain-text answer that matches a regex (models/base.py)
                processor = backend.get_regex_logits_processor(schema[TEXT_PATTERN])
            else:
                # Compact JSON: a small model otherwise spends its tokens on whitespace.
                compact = {**ended_strings(schema), "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
                processor = backend.get_json_schema_logits_processor(json.dumps(compact))
            grammar = self._grammars[key] = processor.grammar
        matcher = llguidance.LLMatcher(self.guidance().llg_tokenizer, grammar)
        if matcher.is_error():
            raise ModelError(f"schema could not be compiled: {matcher.get_error()}")
        return matcher

    def release(self, schema: dict[str, Any], matcher) -> None:
        self._idle_matchers[canonical_json(schema)].append(matcher)

    # -- generation -------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        """Every request as its own sequence, ``parallel`` at a time: a finished
        sequence's slot takes the next request in order. Each step is one
        ``llama_decode`` of one token per live sequence; its time is shared
        equally among them, so the responses' seconds add up to the wall time."""
        sequences = [_Sequence(self, index, request) for index, request in enumerate(requests)]
        waiting = list(reversed(sequences))
        free = list(range(self.parallel))
        live: list[_Sequence] = []
        masks: Future | None = None
        try:
            while waiting or live:
                while waiting and free:
                    sequence = waiting.pop()
                    sequence.slot, source, shared = self._take_slot(sequence.prompt, free)
                    self._evaluate_prompt(sequence, source, shared)
                    if sequence.advance():
                        live.append(sequence)
                    else:
                        free.append(sequence.slot)
                if not live:
                    continue
                live.sort(key=lambda s: s.slot)
                tick = time.perf_counter()
                for i, sequence in enumerate(live):
                    self._batch_token[i] = sequence.next_token
                    self._batch_pos[i] = sequence.n_past
                    self._batch_seq[i][0] = sequence.slot
                    self._batch_logits[i] = 1
                masks = self._masks_ahead(live)
                self._decode(len(live))
                if masks is not None:
                    masks.result()  # the wait, if any, is part of the step's time
                    masks = None
                share = (time.perf_counter() - tick) / len(live)
                still = []
                for i, sequence in enumerate(live):
                    sequence.n_past += 1
                    sequence.eval_seconds += share
                    sequence.logits = self._logits(i)
                    if sequence.advance():
                        still.append(sequence)
                    else:
                        free.append(sequence.slot)
                live = still
        finally:
            if masks is not None:  # llama_decode failed: its matchers go back only once the thread is done with them
                wait([masks])
            for sequence in sequences:
                sequence.give_back()
        return [sequence.response() for sequence in sequences]

    def _masks_ahead(self, live: Sequence["_Sequence"]) -> Future | None:
        """The next masks of the constrained live sequences, computed on the
        masking thread (started on first use) while the main thread waits in
        llama_decode, which holds no Python lock. Each matcher is touched by
        one thread at a time: the main thread waits for these before sampling."""
        if not self.masks_ahead:
            return None
        constrained = [sequence for sequence in live if sequence.matcher is not None]
        if not constrained:
            return None
        if self._masker is None:
            self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="treesynth-mask")
        return self._masker.submit(lambda: [sequence.prepare_mask() for sequence in constrained])

    def _take_slot(self, prompt: list[int], free: list[int]) -> tuple[int, int, int]:
        """(slot, source, shared): the free slot for a prompt, taken out of
        ``free``, and where its reusable prefix is (``_shared_prefix``). The
        slot is the one whose KV holds the longest reusable prefix of the
        prompt, else the one unused longest (never-used slots first), so that
        a prompt asked again (a criterion candidate's, a leaf's next request)
        still finds its KV. A slot holds the same tokens whichever it is, so
        this changes speed, not logits."""
        source, shared = self._shared_prefix(prompt, prefer=free) if self.reuse_prefix else (-1, 0)
        slot = source if source in free else min(free, key=lambda s: (self._last_used[s], s))
        free.remove(slot)
        self._prompts_taken += 1
        self._last_used[slot] = self._prompts_taken
        return slot, source, shared

    def _evaluate_prompt(self, sequence: "_Sequence", source: int, shared: int) -> None:
        """The prompt alone (never in one decode with another request's tokens),
        in chunks of PROMPT_CHUNK, after the longest prefix it shares with a
        prompt whose KV a slot still holds (this slot's last one, or another
        slot's, copied): with flash attention off, a prompt's logits do not
        depend on how it is split, as long as no piece is a single token."""
        lib = self._lib
        tick = time.perf_counter()
        memory = lib.llama_get_memory(self._ctx)
        prompt, slot = sequence.prompt, sequence.slot
        if shared and source != slot:
            lib.llama_memory_seq_rm(memory, slot, -1, -1)
            lib.llama_memory_seq_cp(memory, source, slot, -1, -1)  # across KV streams: the whole stream
        lib.llama_memory_seq_rm(memory, slot, shared if shared else -1, -1)
        self._held[slot] = []  # until the whole prompt is in: a failed decode leaves no false claim
        self.prefix_tokens_reused += shared
        start = shared
        while start < len(prompt):
            n = min(PROMPT_CHUNK, len(prompt) - start)
            if len(prompt) - start - n == 1:  # no single-token piece: it may take another kernel
                n -= 1
            chunk = prompt[start : start + n]
            self._batch_token[:n] = chunk
            self._batch_pos[:n] = np.arange(start, start + n)
            self._batch_logits[:n] = 0
            for i in range(n):
                self._batch_seq[i][0] = slot
            last = start + n == len(prompt)
            if last:
                self._batch_logits[n - 1] = 1
            self._decode(n)
            start += n
        self._held[slot] = prompt
        sequence.n_past = len(prompt)
        sequence.logits = self._logits(n - 1)
        sequence.prompt_seconds = time.perf_counter() - tick

    def _shared_prefix(self, prompt: list[int], prefer: Sequence[int] = ()) -> tuple[int, int]:
        """(slot, tokens): the slot whose held prompt shares the most leading
        tokens with this one (of equals, one in ``prefer``, then the lowest),
        and how many may be reused: at least MIN_SHARED_PREFIX, and never the
        last two (so the rest is evaluated in pieces of two tokens or more)."""
        best_slot, best = -1, 0
        for slot, held in enumerate(self._held):
            n = _common_prefix(held, prompt)
            if n > best or (n == best and n and slot in prefer and best_slot not in prefer):
                best_slot, best = slot, n
        best = min(best, len(prompt) - 2)
        return (best_slot, best) if best >= MIN_SHARED_PREFIX else (-1, 0)

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        code = self._lib.llama_decode(self._ctx, self._batch)
        if code != 0:
            raise ModelError(f"llama_decode failed with code {code} ({n} tokens, {self.parallel} sequences)")

    def _logits(self, i: int) -> np.ndarray:
        # A view, valid until the next llama_decode: each sequence samples from it first.
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n


class _Sequence:
    """One request being decoded: its prompt, constraint, RNG, tokens and timings."""

    def __init__(self, model: LlamaCppModel, index: int, request: Request):
        started = time.perf_counter()
        self.model, self.index, self.request = model, index, request
        self.prompt = model.tokenize_prompt(request.messages)
        budget = model.n_ctx - len(self.prompt)
        if budget <= 0:
            raise ModelError(f"prompt of {len(self.prompt)} tokens does not fit the context of {model.n_ctx}")
        self.max_tokens = min(request.max_tokens, budget)
        self.matcher = model.matcher(request.schema) if request.schema is not None else None
        self.words = np.zeros((model.n_vocab + 31) // 32, dtype="<u4") if self.matcher is not None else None
        self.mask_ready = False  # whether ``words`` holds the mask of the matcher's current state
        self.rng = np.random.Generator(np.random.PCG64(request.seed))
        self.out: list[int] = []
        self.finish = "length"
        self.slot = -1
        self.n_past = 0
        self.next_token = -1
        self.logits: np.ndarray | None = None
        self.setup_seconds = time.perf_counter() - started
        self.prompt_seconds = self.eval_seconds = self.sample_seconds = 0.0

    def prepare_mask(self) -> None:
        """The mask for the next token, ahead of the logits (on the masking
        thread). A matcher that stopped or fails is left to ``_advance``,
        which reports it as it always does."""
        try:
            if not self.matcher.is_stopped():
                self._fill_mask()
                self.mask_ready = True
        except Exception:  # noqa: BLE001 - raised again, with its message, where the mask is used
            self.mask_ready = False

    def _fill_mask(self) -> None:
        """The matcher's bitmask of allowed tokens for its current state, into ``words``."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)

    def advance(self) -> bool:
        """Pick the next token from the current logits; True while the
        sequence needs that token evaluated, False once it is finished."""
        tick = time.perf_counter()
        try:
            return self._advance()
        finally:
            self.sample_seconds += time.perf_counter() - tick

    def _advance(self) -> bool:
        matcher, logits = self.matcher, self.logits
        if matcher is None:
            ids = top_candidates(logits)
        else:
            if matcher.is_stopped():
                if matcher.is_error():
                    raise ModelError(f"constraint failed: {matcher.get_error()}")
                self.finish = "stop"
                return False
            if not self.mask_ready:  # the first token after the prompt, or a mask the thread could not make
                self._fill_mask()
            self.mask_ready = False
            ids = allowed_candidates(logits, self.words)
            if ids.size == 0:
                raise ModelError(f"constraint allows no token: {matcher.get_error() or 'empty mask'}")
        request = self.request
        token = sample_candidates(ids, logits[ids], request.temperature, request.top_p, self.rng)
        if matcher is not None and not matcher.consume_token(token):
            raise ModelError(f"constraint rejected token {token}: {matcher.get_error()}")
        if self.model._lib.llama_vocab_is_eog(self.model._vocab, token):
            self.finish = "stop"
            return False
        self.out.append(token)
        if matcher is not None and matcher.is_stopped():  # the answer is complete: no logits needed after it
            self.finish = "stop"
            return False
        if len(self.out) >= self.max_tokens:  # cut off: the same
            return False
        self.next_token = token
        return True

    def give_back(self) -> None:
        if self.matcher is not None:
            self.model.release(self.request.schema, self.matcher)
            self.matcher = None

    def response(self) -> Response:
        setup, prompt, decode = self.setup_seconds, self.prompt_seconds, self.eval_seconds + self.sample_seconds
        return Response(
            text=self.model.llm.detokenize(self.out).decode("utf-8", errors="replace"),
            completion_tokens=len(self.out),
            prompt_tokens=len(self.prompt),
            seconds=setup + prompt + decode,
            finish_reason=self.finish,
            # Where the time went: set-up (template, tokens, constraint), the
            # prompt, the decode loop, and this sequence's share of llama.cpp's
            # steps within that loop.
            extra={"setup_seconds": setup, "prompt_seconds": prompt, "decode_seconds": decode, "eval_seconds": self.eval_seconds},
        )


def ended_strings(schema: Any) -> Any:
    """The schema with every free-text string (no pattern, format, enum or
    const) given a pattern that keeps its length bounds and ends it in
    ``STRING_END``: llguidance cannot intersect a pattern with minLength and
    maxLength, so the bounds move into the pattern. Only the grammar sees it:
    the sample schema that validates answers is unchanged, and whatever this
    grammar admits, that schema admits too."""
    if isinstance(schema, list):
        return [ended_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: ended_strings(value) if key in ("items", "anyOf", "oneOf", "allOf") else value for key, value in schema.items()}
    for key in ("properties", "$defs"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: ended_strings(sub) for name, sub in schema[key].items()}
    if schema.get("type") == "string" and not any(key in schema for key in ("pattern", "format", "enum", "const")):
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        body = f"(?s:.{{{max(low - 1, 0)},{'' if high is None else int(high) - 1}}})"
        out["pattern"] = f"^{body}{STRING_END}$" if low >= 1 else f"^({body}{STRING_END})?$"
    return out


def kv_bytes_per_token(lib, model, meta: dict[str, str]) -> int:
    """Bytes of f16 K and V cache one token takes over all layers."""
    n_embd, n_head = lib.llama_model_n_embd(model), max(1, lib.llama_model_n_head(model))
    n_head_kv, n_layer = lib.llama_model_n_head_kv(model), lib.llama_model_n_layer(model)
    arch = meta.get("general.architecture", "")
    k = int(meta.get(f"{arch}.attention.key_length", n_embd // n_head))
    v = int(meta.get(f"{arch}.attention.value_length", n_embd // n_head))
    return n_layer * n_head_kv * (k + v) * 2


def memory_available() -> int:
    """MemAvailable from /proc/meminfo; the total physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# -- constraint plumbing -------------------------------------------------------


def llguidance_tokenizer(lib, vocab):
    """``llguidance.llamacpp.lltokenizer_from_vocab`` with the same token bytes,
    read through llama-cpp-python's C bindings directly: its per-token Python
    wrappers cost half of the cold start on a 262k vocabulary."""
    import ctypes

    from llguidance import LLTokenizer

    control, user_defined = lib.LLAMA_TOKEN_ATTR_CONTROL, lib.LLAMA_TOKEN_ATTR_USER_DEFINED
    size = 256
    buffer = ctypes.create_string_buffer(size)
    tokens: list[bytes] = []
    for token in range(lib.llama_vocab_n_tokens(vocab)):
        n = lib.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if n < 0:  # longer than the buffer: -n is its length
            big = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(vocab, token, big, -n, 0, True)
            piece = ctypes.string_at(big, n)
        else:
            piece = ctypes.string_at(buffer, n)
        attr = lib.llama_vocab_get_attr(vocab, token)
        # Control tokens (and user-defined ones that look like them) are marked special, as llguidance expects.
        if attr & control or (attr & user_defined and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    return LLTokenizer.from_llamacpp(
        tokens=tokens,
        vocab_ptr=vocab,
        tokenize_fptr=ctypes.cast(lib.llama_tokenize, ctypes.c_void_p).value,
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
