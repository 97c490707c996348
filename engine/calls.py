"""Model calls through the store's call log: the one place where a call is
keyed and a finished call is answered from the store instead of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from treesynth.models.base import Model, Request, Response
from treesynth.store import CallRecord, Store
from treesynth.store.keys import call_key

# Requests per batch handed to the model, per sequence it decodes at once: a
# slot that finishes early takes the next request of the batch; answers are
# committed when the whole batch is back. The tree driver and balance both
# cut their calls into batches of ``batch_size(model)``.
BATCH_PER_SEQUENCE = 4


def sequences(model: Model) -> int:
    """Sequences the model decodes at once (1 for a model that does not say)."""
    return max(1, int(getattr(model, "parallel", 1)))


def batch_size(model: Model) -> int:
    return BATCH_PER_SEQUENCE * sequences(model)


@dataclass(frozen=True)
class KeyedCall:
    key: str
    request: Request
    where: dict[str, Any]  # node, role, step, attempt
    stored: dict[str, Any] | None  # the call log's row, when the call was made before


def look_up(store: Store, fingerprint: dict[str, Any], calls: Sequence[tuple[Request, dict[str, Any]]]) -> list[KeyedCall]:
    """Each call (a request and where it belongs) with its key and, when the
    store's call log has it, its stored answer."""
    keyed = []
    for request, where in calls:
        key = call_key(fingerprint, request.key_material())
        keyed.append(KeyedCall(key, request, where, store.cached_call(key)))
    return keyed


def answer(
    model: Model, calls: Sequence[KeyedCall], ahead: dict[str, Response] | None = None, extra: Sequence[KeyedCall] = ()
) -> list[tuple[CallRecord | None, Response, bool]]:
    """Per call: its record to commit (None for a call replayed from the
    store: it is there already), its response, and whether it was replayed.
    The calls the store cannot answer go to the model in one ``generate``,
    in the order given, followed by ``extra``: calls decoded ahead of their
    turn, whose answers wait in ``ahead`` (by key, never stored) until the
    call is made; a call found there is taken from it, not sent again."""
    ahead = {} if ahead is None else ahead
    missing = [call.request for call in calls if call.stored is None and call.key not in ahead]
    responses = model.generate(missing + [call.request for call in extra]) if missing or extra else []
    fresh = iter(responses[: len(missing)])
    ahead.update((call.key, response) for call, response in zip(extra, responses[len(missing) :]))
    answered = []
    for call in calls:
        row = call.stored
        if row is not None:
            response = Response(row["response"], row["completion_tokens"], row["prompt_tokens"], row["seconds"], row["finish_reason"])
            answered.append((None, response, True))
            continue
        response = ahead.pop(call.key) if call.key in ahead else next(fresh)
        record = CallRecord(
            key=call.key,
            request=call.request.key_material(),
            response=response.text,
            completion_tokens=response.completion_tokens,
            prompt_tokens=response.prompt_tokens,
            seconds=response.seconds,
            finish_reason=response.finish_reason,
            **call.where,
        )
        answered.append((record, response, False))
    return answered
