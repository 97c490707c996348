"""What exact resume needs from the real model (SmolLM2-135M via llama.cpp):
an answer depends only on its request. Not on what an earlier call left in
the KV cache, not on the other requests in the same list, and not on the
llama.cpp thread count, which is therefore a setting that may change between
runs of one store and is not part of the model fingerprint."""

from __future__ import annotations


from treesynth.engine import prompts
from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA
from treesynth.engine.schemas import criterion_schema, samples_schema
from treesynth.models.base import Request
from treesynth.models.embedded import default_model_path
from treesynth.models.llamacpp import LlamaCppModel

DESCRIPTION = "GSM8K-style grade-school math word problems"
PIVOTS = [
    {"text": "Tom has 3 apples and buys 5 more. How many apples does he have now?"},
    {"text": "A train travels 60 miles per hour for 2 hours. How far does it go?"},
    {"text": "Sara reads 12 pages a day. How many pages does she read in a week?"},
]


def request(seed: int, subspace: list[tuple[str, str]], schema=True, max_tokens: int = 40) -> Request:
    """A real pivot-samples prompt; requests differing only in the subspace
    share a long prefix, which is what prefix reuse would key on."""
    messages = prompts.pivots_messages(DESCRIPTION, subspace, DEFAULT_SAMPLE_SCHEMA, 2)
    return Request(
        messages=messages,
        schema=samples_schema(DEFAULT_SAMPLE_SCHEMA, 2) if schema else None,
        max_tokens=max_tokens,
        temperature=0.9,
        top_p=0.95,
        seed=seed,
    )


def criterion_request(seed: int, max_tokens: int = 16) -> Request:
    """A longer prompt (about 250 tokens), evaluated as one prompt batch."""
    messages = prompts.criterion_messages(DESCRIPTION, [], PIVOTS, [])
    return Request(messages=messages, schema=criterion_schema(3), max_tokens=max_tokens, temperature=0.5, top_p=0.95, seed=seed)


def texts(model: LlamaCppModel, requests: list[Request]) -> list[str]:
    return [response.text for response in model.generate(requests)]


def test_an_answer_does_not_depend_on_earlier_calls_or_its_batch(smollm):
    model = smollm  # one thread; shared with other tests, so it has decoded other prompts before
    a = request(7, [("topic", "money")])
    b = request(8, [("topic", "time")], schema=False)
    (first,) = texts(model, [a])
    texts(model, [b, criterion_request(9)])  # leaves other prompts in the KV cache
    (again,) = texts(model, [a])
    assert again == first
    assert texts(model, [b, a])[1] == first
    # The check can fail: the same prompt with another seed samples another answer.
    (other,) = texts(model, [request(70, [("topic", "money")])])
    assert other != first


def test_thread_count_does_not_change_answers(smollm):
    requests = [criterion_request(21), request(22, [("topic", "fractions")], schema=False, max_tokens=16)]
    two_threads = LlamaCppModel(default_model_path(), threads=2, n_ctx=2048, parallel=2)
    assert len(two_threads.tokenize_prompt(requests[0].messages)) > 200
    assert texts(smollm, requests) == texts(two_threads, requests)
    # So the thread count is no part of what identifies a model's outputs.
    assert two_threads.fingerprint == smollm.fingerprint
    assert "threads" not in smollm.fingerprint
