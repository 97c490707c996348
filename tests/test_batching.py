"""Batched decoding on the real embedded model (SmolLM2-135M via llama.cpp):
a request's tokens are the same decoded alone, among 1 or 15 other
sequences, with a prompt longer than one prompt chunk, so ``--parallel``
changes speed and never content. Kernel choices change between ggml
versions: this file guards every upgrade of llama-cpp-python. Also the
plumbing around it: the KV cache size a ``--parallel`` needs, the GPU
options on a CPU build, and what the fingerprint records."""

from __future__ import annotations

import pytest

from treesynth.engine import prompts
from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA
from treesynth.engine.schemas import criterion_schema, request_schema
from treesynth.models.base import ModelError, Request
from treesynth.models.embedded import default_model_path
from treesynth.models.llamacpp import PROMPT_CHUNK, LlamaCppModel

DESCRIPTION = "Short product reviews of kitchen appliances"
PIVOTS = [{"text": f"Review {i}: the {thing} works well but is loud and hard to clean after use."}
          for i, thing in enumerate(["blender", "toaster", "kettle", "mixer", "air fryer", "juicer", "rice cooker", "grill",
                                     "coffee maker", "food processor", "slow cooker", "waffle iron"])]  # fmt: skip


def sample_request(seed: int, value: str, schema: bool = True, max_tokens: int = 48) -> Request:
    messages = prompts.leaf_messages(DESCRIPTION, [("appliance", value)], DEFAULT_SAMPLE_SCHEMA, 1)
    return Request(
        messages=messages,
        schema=request_schema(DEFAULT_SAMPLE_SCHEMA, 1) if schema else None,
        max_tokens=max_tokens,
        temperature=0.9,
        top_p=0.95,
        seed=seed,
    )


def long_request(seed: int) -> Request:
    """A criterion prompt over 12 pivots: longer than one prompt chunk."""
    messages = prompts.criterion_messages(DESCRIPTION, [], PIVOTS, [])
    return Request(messages=messages, schema=criterion_schema(len(PIVOTS)), max_tokens=40, temperature=0.5, top_p=0.95, seed=seed)


@pytest.fixture(scope="module")
def alone() -> LlamaCppModel:
    return LlamaCppModel(default_model_path(), n_ctx=2048, threads=1, parallel=1)


@pytest.fixture(scope="module")
def sixteen() -> LlamaCppModel:
    return LlamaCppModel(default_model_path(), n_ctx=2048, threads=1, parallel=16)


def test_a_sequence_decodes_the_same_alone_and_among_1_or_15_neighbours(alone, sixteen):
    watched = [sample_request(5, "kettle"), sample_request(6, "toaster", schema=False), long_request(7)]
    assert len(alone.tokenize_prompt(watched[2].messages)) > PROMPT_CHUNK
    by_itself = [alone.generate([request])[0] for request in watched]
    assert all(r.completion_tokens >= 8 for r in by_itself)
    neighbours = [sample_request(100 + i, value, schema=i % 3 != 0, max_tokens=8 + 3 * i)
                  for i, value in enumerate(["blender", "grill", "juicer", "mixer", "oven", "fridge", "wok", "pan",
                                             "kettle", "scale", "knife", "sieve", "ladle", "whisk", "timer"])]  # fmt: skip
    for i, (request, expected) in enumerate(zip(watched, by_itself)):
        pair = sixteen.generate([neighbours[i], request])
        assert pair[1].text == expected.text
    # One crowd of sixteen: the three watched requests among 13 neighbours that
    # end at different steps (8 to 50 tokens, over the watched ones' 40 to 48),
    # so each watched one decodes
    # beside a batch that shrinks and whose slots take the next request.
    crowd_requests = neighbours[:5] + [watched[0]] + neighbours[5:9] + [watched[1]] + neighbours[9:13] + [watched[2]]
    crowd = sixteen.generate(crowd_requests)
    for at, expected in zip((5, 10, 15), by_itself):
        assert crowd[at].text == expected.text
        assert crowd[at].completion_tokens == expected.completion_tokens
    # The neighbours really decoded side by side and differ from each other,
    # and prompts started from KV that another prompt left (its own slot's or a
    # copied one): a different split of the prompt on each side, the same tokens.
    assert len({r.text for r in crowd}) == 16
    assert alone.prefix_tokens_reused > 0 and sixteen.prefix_tokens_reused > 0
    # The check can fail: another seed gives another answer.
    assert alone.generate([sample_request(55, "kettle")])[0].text != by_itself[0].text


def test_a_prompt_asked_again_takes_the_slot_that_holds_it():
    """Criterion candidates and a leaf's next requests repeat prompts: a free
    slot whose KV holds the prompt is taken over the first free one, so asking
    C and A again after A, B, C evaluates two tokens of each, not all of A."""
    three = LlamaCppModel(default_model_path(), n_ctx=1024, threads=1, parallel=3)
    a, b, c = (sample_request(300 + i, value, max_tokens=4) for i, value in enumerate(["oven", "grill", "wok"]))
    first = three.generate([a, b, c])
    reused = three.prefix_tokens_reused
    again = three.generate([c, a])
    lengths = [len(three.tokenize_prompt(r.messages)) for r in (c, a)]
    assert three.prefix_tokens_reused - reused == sum(n - 2 for n in lengths)
    assert [r.text for r in again] == [first[2].text, first[0].text]


def test_more_requests_than_sequences_queue_and_keep_their_order(sixteen):
    requests = [sample_request(200 + i, f"appliance number {i}", max_tokens=12 + i % 5) for i in range(20)]
    batched = sixteen.generate(requests)
    assert [r.text for r in batched[16:]] == [sixteen.generate([q])[0].text for q in requests[16:]]
    assert all(r.finish_reason in ("stop", "length") and r.seconds > 0 for r in batched)


def test_a_parallel_too_large_for_the_kv_cache_is_refused_naming_the_limit():
    with pytest.raises(ModelError) as refused:
        LlamaCppModel(default_model_path(), n_ctx=4096, parallel=64, kv_limit=2**30)
    message = str(refused.value)
    assert "--parallel 64 with --n-ctx 4096 needs 5.6 GiB of KV cache" in message
    assert "the limit is 1.0 GiB" in message and "\n" not in message
    with pytest.raises(ModelError, match="more than llama.cpp's limit of 256 sequences"):
        LlamaCppModel(default_model_path(), parallel=257)


def test_fingerprint_records_what_decides_the_kernels_and_not_parallel(alone, sixteen):
    assert alone.fingerprint == sixteen.fingerprint
    fingerprint = alone.fingerprint
    assert fingerprint["kv"] == "per-sequence" and fingerprint["flash_attn"] is False
    assert fingerprint["prompt_chunk"] == PROMPT_CHUNK
    assert fingerprint["offload"] == ("cpu" if not alone.gpu else fingerprint["offload"])
    assert "parallel" not in fingerprint


def test_gpu_layers_on_a_build_without_a_gpu_backend_is_one_clear_error(alone):
    if alone.gpu:  # a CUDA/Metal build: the option is valid there
        assert alone.gpu_layers > 0
        return
    with pytest.raises(ModelError, match="built without a GPU backend") as refused:
        LlamaCppModel(default_model_path(), gpu_layers=4)
    assert "make setup GPU=cuda" in str(refused.value)


def test_a_store_made_on_the_cpu_is_not_continued_with_layers_on_a_gpu(tmp_path, alone):
    # GPU kernels give other logits than CPU ones: where the layers run is part
    # of the model fingerprint, so a CPU store resumed on a GPU is refused.
    from treesynth.engine.config import build_config
    from treesynth.engine.runs import load_embedder, method_of, open_run_store
    from treesynth.store import StoreError

    config = build_config({"description": DESCRIPTION}, {})
    method = method_of(load_embedder())
    store, resumed = open_run_store(tmp_path / "cpu.db", config, alone.fingerprint, method)
    store.close()
    assert not resumed
    on_gpu = {**alone.fingerprint, "offload": "30/30 layers on GPU"}
    with pytest.raises(StoreError) as refused:
        open_run_store(tmp_path / "cpu.db", config, on_gpu, method)
    assert "model.offload" in str(refused.value) and "\n" not in str(refused.value)
    again, resumed = open_run_store(tmp_path / "cpu.db", config, alone.fingerprint, method)
    again.close()
    assert resumed


def test_another_model_decodes_one_sequence_by_default_and_more_with_a_warning(tmp_path):
    # Batch invariance was measured for the embedded model only (Gemma 3 270M
    # Q4_K_M decoded differently among 7 neighbours): another GGUF gets
    # --parallel 1 unless asked, and a warning when asked for more.
    import shutil

    from treesynth.models.llamacpp import DEFAULT_PARALLEL
    from treesynth.models.loader import load_model

    other = tmp_path / "another-model.gguf"
    shutil.copyfile(default_model_path(), other)
    warnings: list[str] = []
    assert load_model(None, n_ctx=512, warn=warnings.append).parallel == DEFAULT_PARALLEL
    assert load_model(str(default_model_path()), n_ctx=512, warn=warnings.append).parallel == DEFAULT_PARALLEL
    one = load_model(str(other), n_ctx=512, warn=warnings.append)
    assert one.parallel == 1 and not one.reuse_prefix and one.fingerprint["prompt_prefix_reuse"] == 0
    assert warnings == []
    assert load_model(str(other), n_ctx=512, parallel=3, warn=warnings.append).parallel == 3
    [warning] = warnings
    assert "--parallel 3 on another-model.gguf" in warning and "batch-invariant" in warning and "\n" not in warning
