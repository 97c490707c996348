"""A model call through the store's call log: the one place where a call is
keyed and a finished call is answered from the store instead of the model."""

from __future__ import annotations

from typing import Any

from treesynth.models.base import Model, Request, Response
from treesynth.store import CallRecord, Store
from treesynth.store.keys import call_key


def answer_call(
    model: Model, store: Store, fingerprint: dict[str, Any], request: Request, *, node: str, role: str, step: str, attempt: int
) -> tuple[CallRecord, Response, bool]:
    """(the call's record to commit, its response, whether it was replayed from the store)."""
    key = call_key(fingerprint, request.key_material())
    row = store.cached_call(key)
    if row is not None:
        response = Response(row["response"], row["completion_tokens"], row["prompt_tokens"], row["seconds"], row["finish_reason"])
    else:
        response = model.generate([request])[0]
    record = CallRecord(
        key=key,
        node=node,
        role=role,
        step=step,
        attempt=attempt,
        request=request.key_material(),
        response=response.text,
        completion_tokens=response.completion_tokens,
        prompt_tokens=response.prompt_tokens,
        seconds=response.seconds,
        finish_reason=response.finish_reason,
    )
    return record, response, row is not None
