"""Constrained decoding on both real models (the embedded SmolLM2, 49k tokens,
and Gemma 3 270M, a 262k-token vocabulary), and the sampler that applies the
llguidance mask: sparse ids or filtered best logits, never the whole vocabulary,
always choosing what masking the whole vocabulary would have chosen.

Models run with one thread: on a machine that other processes keep busy,
llama.cpp's threads wait on each other and two threads can be ten times slower."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import jsonschema
import numpy as np
import pytest

from treesynth.store.keys import canonical_json
from treesynth.models.embedded import gemma_path
from treesynth.engine import prompts
from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA
from treesynth.engine.schemas import coverage_schema, criterion_schema, request_schema, samples_schema
from treesynth.models.base import Request
from treesynth.models.embedded import default_model_path
from treesynth.models.llamacpp import (
    STRING_END,
    TOP_K,
    LlamaCppModel,
    _Sequence,
    allowed_candidates,
    ended_strings,
    llguidance_tokenizer,
    sample_candidates,
    top_candidates,
)

DESCRIPTION = "Short grade-school math word problems"
PIVOTS = [{"text": "Sam has 5 apples and buys 3 more. How many now?"}, {"text": "A train goes 60 mph for 2 hours. How far?"}]


@pytest.fixture(scope="module")
def gemma() -> LlamaCppModel:
    return LlamaCppModel(gemma_path(), n_ctx=2048, threads=1)


def engine_requests() -> dict[str, Request]:
    """The engine's four steps, with its prompts and schemas. max_tokens covers
    the schemas' bounds (a sample's text is at most 400 characters), so every
    answer can finish."""
    sample = DEFAULT_SAMPLE_SCHEMA
    path = [("topic", "shopping")]
    return {
        "pivots": Request(prompts.pivots_messages(DESCRIPTION, [], sample, 1), samples_schema(sample, 1), 600, 0.9, 0.95, 1),
        "criterion": Request(prompts.criterion_messages(DESCRIPTION, [], PIVOTS, []), criterion_schema(2), 300, 0.5, 0.95, 2),
        "coverage": Request(prompts.coverage_messages(DESCRIPTION, path, "numbers", ["whole", "fractions"]), coverage_schema(), 300, 0.5, 0.95, 3),
        "leaf": Request(prompts.leaf_messages(DESCRIPTION, path, sample, 1), samples_schema(sample, 1), 600, 0.9, 0.95, 4),
    }


# -- real models ------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["smollm", "gemma"])
def test_engine_schemas_give_valid_json_on_both_models(model_name, request):
    model = request.getfixturevalue(model_name)
    for role, call in engine_requests().items():
        response = model.generate([call])[0]
        assert response.finish_reason == "stop", (role, response.text)
        jsonschema.validate(json.loads(response.text), call.schema)


ENUM_SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "enum": ["qzx-4471", "vvk-0093"]}, "size": {"type": "integer", "minimum": 70, "maximum": 71}},
    "required": ["code", "size"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("model_name", ["smollm", "gemma"])
def test_constraint_applies_where_the_model_would_write_otherwise(model_name, request):
    """Would fail if the mask were silently dropped: unprompted, neither model
    writes these codes; constrained, nothing else can come out."""
    model = request.getfixturevalue(model_name)
    call = Request((("user", "Tell me a short story about a cat."),), ENUM_SCHEMA, 40, 1.0, 1.0, seed=5)
    free = model.generate([dataclasses.replace(call, schema=None)])[0].text
    assert "qzx-4471" not in free and "vvk-0093" not in free
    for seed in range(3):
        answer = json.loads(model.generate([dataclasses.replace(call, seed=seed)])[0].text)
        jsonschema.validate(answer, ENUM_SCHEMA)


def test_free_text_strings_keep_their_bounds_and_may_not_end_open():
    schema = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 20, "maxLength": 400},
            "notes": {"type": "array", "items": {"type": "string", "maxLength": 5}},
            "label": {"type": "string", "enum": ["A", "B"]},
            "code": {"type": "string", "pattern": "^[a-z]+$"},
        },
    }
    ended = ended_strings(schema)
    text, note = ended["properties"]["text"], ended["properties"]["notes"]["items"]
    assert text == {"type": "string", "pattern": "^(?s:.{19,399})" + STRING_END + "$"}
    assert note == {"type": "string", "pattern": "^((?s:.{0,4})" + STRING_END + ")?$"}
    assert ended["properties"]["label"] == schema["properties"]["label"]
    assert ended["properties"]["code"] == schema["properties"]["code"]
    assert schema["properties"]["text"] == {"type": "string", "minLength": 20, "maxLength": 400}  # not modified
    for sample, admitted in [("x" * 19 + ".", True), ("x" * 18 + ".", False), ("x" * 399 + "!", True), ("x" * 400 + "!", False),
                             ("the problem is ", False), ("the problem is:", False), ("done,", False), ("line one\nand line two.", True)]:
        assert bool(re.fullmatch(text["pattern"][1:-1], sample, re.S)) is admitted, sample


def test_a_small_model_never_ends_a_sample_where_it_meant_to_open_a_quotation(smollm):
    """Unconstrained at the end, 3 of 16 of these answers stopped at a bare `"`
    after "...the problem is " (the model opening a quotation); now every
    answer ends in a character that can end a text, and validates."""
    messages = prompts.pivots_messages("GSM8K-style grade-school math word problems", [("mood", "excited")], DEFAULT_SAMPLE_SCHEMA, 1)
    answers = smollm.generate([Request(messages, request_schema(DEFAULT_SAMPLE_SCHEMA, 1), 400, 0.9, 0.95, seed) for seed in range(12)])
    finished = [json.loads(answer.text) for answer in answers if answer.finish_reason == "stop"]
    assert len(finished) >= 10, [a.text for a in answers]
    for sample in finished:
        jsonschema.validate(sample, DEFAULT_SAMPLE_SCHEMA)
        assert re.fullmatch(STRING_END, sample["text"][-1]), sample["text"]


def test_a_reused_compiled_schema_gives_the_same_answer_as_a_fresh_compile(smollm):
    call = engine_requests()["criterion"]
    first = smollm.generate([call])[0].text  # compiles the schema
    smollm.generate([engine_requests()["coverage"]])  # another schema in between
    reused = smollm.generate([call])[0].text  # the cached matcher, reset
    fresh = LlamaCppModel(default_model_path(), n_ctx=2048, threads=1)  # nothing cached
    assert reused == first == fresh.generate([call])[0].text
    assert len(smollm._grammars) >= 2 and len(fresh._grammars) == 1


def test_masks_made_while_llama_cpp_decodes_are_those_made_at_sampling(smollm, gemma, monkeypatch):
    """With a large vocabulary, each live sequence's next mask is computed on
    the masking thread during llama_decode; the answers are the same bytes as
    with every mask computed on the main thread at the moment of sampling.
    (SmolLM2 keeps its masks on the main thread, where they cost less; it is
    switched over here, as the faster model to test on.)"""
    assert gemma.masks_ahead and not smollm.masks_ahead
    monkeypatch.setattr(smollm, "masks_ahead", True)
    # Two schemas, one matcher each: the pool test below expects one idle leaf matcher.
    calls = [dataclasses.replace(engine_requests()[role], max_tokens=48, seed=40 + i) for i, role in enumerate(("criterion", "leaf"))]
    made_on: list[tuple[str, bool]] = []
    prepare = _Sequence.prepare_mask

    def recorded(sequence):
        prepare(sequence)
        made_on.append((threading.current_thread().name, sequence.mask_ready))

    monkeypatch.setattr(_Sequence, "prepare_mask", recorded)
    ahead = smollm.generate(calls)
    assert len(made_on) >= 30 and all(name.startswith("treesynth-mask") and ready for name, ready in made_on)
    monkeypatch.setattr(LlamaCppModel, "_masks_ahead", lambda model, live: None)
    at_sampling = smollm.generate(calls)
    assert [r.text for r in ahead] == [r.text for r in at_sampling]
    assert all(r.completion_tokens >= 10 for r in ahead) and sum(r.completion_tokens for r in ahead) >= 40


def test_a_schema_is_compiled_once_and_its_matcher_reused(smollm):
    # Setup time after the first compile is measured by `make bench`, not here:
    # a timed assertion on a shared machine tests the machine.
    call = engine_requests()["leaf"]
    smollm.generate([dataclasses.replace(call, max_tokens=1)])
    grammars = dict(smollm._grammars)
    key = canonical_json(call.schema)
    [idle] = smollm._idle_matchers[key]
    smollm.generate([dataclasses.replace(call, max_tokens=1)])
    assert smollm._grammars.keys() == grammars.keys()
    assert all(smollm._grammars[k] is grammars[k] for k in grammars)
    assert smollm._idle_matchers[key] == [idle]  # the same matcher, taken, reset and given back
    # Two sequences of one schema at once need two matchers; both are kept.
    smollm.generate([dataclasses.replace(call, max_tokens=1), dataclasses.replace(call, max_tokens=1, seed=99)])
    assert len(smollm._idle_matchers[key]) == 2


def test_our_tokenizer_matches_llguidances_own(smollm):
    import llguidance.llamacpp

    ours = llguidance_tokenizer(smollm._lib, smollm._vocab)
    theirs = llguidance.llamacpp.lltokenizer_from_vocab(smollm._vocab)
    assert ours.vocab_size == theirs.vocab_size == smollm.n_vocab
    ids = list(range(smollm.n_vocab))
    assert [ours.decode_bytes([i]) for i in ids] == [theirs.decode_bytes([i]) for i in ids]
    assert [ours.is_special_token(i) for i in ids] == [theirs.is_special_token(i) for i in ids]
    assert any(ours.is_special_token(i) for i in ids)


# -- the sampler, without a model --------------------------------------------------------


def reference_sample(logits, allowed, temperature, top_p, rng):
    """Mask the whole vocabulary with -inf, then top-k by (logit, lower id), temperature, top-p."""
    masked = np.where(allowed, logits, -np.inf)
    order = np.lexsort((np.arange(masked.size), -masked))[: min(TOP_K, int(allowed.sum()))]
    if temperature <= 0:
        return int(order[0])
    z = masked[order].astype(np.float64) / temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, p.size)
    p = p[:keep] / p[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), keep - 1)])


def pack(allowed: np.ndarray) -> np.ndarray:
    padded = np.zeros((allowed.size + 31) // 32 * 32, dtype=bool)
    padded[: allowed.size] = allowed
    return np.packbits(padded, bitorder="little").view("<u4")


def masks(n: int, rng: np.random.Generator, logits: np.ndarray):
    yield "all", np.ones(n, dtype=bool)
    few = np.zeros(n, dtype=bool)
    few[rng.choice(n, 7, replace=False)] = True
    yield "few", few
    yield "half", rng.random(n) < 0.5
    best_barred = np.ones(n, dtype=bool)
    best_barred[np.argsort(-logits)[:3000]] = False  # the best raw logits are all disallowed
    yield "best barred", best_barred
    one = np.zeros(n, dtype=bool)
    one[n - 1] = True
    yield "last token only", one


@pytest.mark.parametrize("n", [49152, 262144])
def test_sampler_chooses_what_whole_vocabulary_masking_chooses(n):
    rng = np.random.default_rng(n)
    for trial in range(12):
        logits = (rng.standard_normal(n) * rng.uniform(1, 5)).astype(np.float32)
        if trial % 3 == 0:  # ties around the k-th best: the lower id must win
            logits[rng.choice(n, 200, replace=False)] = np.sort(logits)[-30]
        for name, allowed in masks(n, rng, logits):
            words = pack(allowed)
            ids = allowed_candidates(logits, words)
            assert allowed[ids].all() and np.all(np.diff(ids) > 0), name
            for temperature, top_p in [(0.0, 1.0), (0.7, 0.95), (1.3, 1.0)]:
                seed = trial * 10 + int(temperature * 10)
                ours = sample_candidates(ids, logits[ids], temperature, top_p, np.random.default_rng(seed))
                assert ours == reference_sample(logits, allowed, temperature, top_p, np.random.default_rng(seed)), (name, trial)


def test_top_candidates_hold_the_k_best_and_few_others():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(262144).astype(np.float32)
    ids = top_candidates(logits)
    assert set(np.argsort(-logits)[:TOP_K]) <= set(ids.tolist())
    assert ids.size < 20_000  # a shortcut, not the whole vocabulary
    # NaN logits: no shortcut can be trusted, so every id
    assert top_candidates(np.full(262144, np.nan, dtype=np.float32)).size == 262144
