"""A deterministic fake model for fast tests, and for the crash tests that
kill a real ``treesynth run`` process (``--model fake:``).

Each answer is a valid instance of the request's JSON schema, drawn from an
RNG seeded by the request's content: the same request always gets the same
answer, whatever was asked before. Tests may ``enqueue`` scripted answers,
which are returned first, in order; ``history`` records every request."""

from __future__ import annotations

import os
import random
import time
from typing import Any, Sequence

import xxhash

from treesynth.models.base import ModelError, Request, Response
from treesynth.store.keys import canonical_json

WORDS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kelp", "lumen")


class FakeModel:
    def __init__(
        self, *, delay: float = 0.0, variant: int = 0, call_log: str | None = None, parallel: int = 1, fail_after: int | None = None
    ):
        self.parallel = parallel  # batch size the driver aims at; answers come one at a time
        self.fail_after = fail_after  # answer this many calls, then raise ModelError (a model that breaks mid-run)
        self.delay = delay
        self.variant = variant
        self.call_log = call_log
        self.queue: list[str] = []
        self.history: list[Request] = []

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "fake", "version": 1, "variant": self.variant}

    def enqueue(self, *texts: str) -> None:
        self.queue.extend(texts)

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        return [self._one(r) for r in requests]

    def _one(self, request: Request) -> Response:
        if self.fail_after is not None and len(self.history) >= self.fail_after:
            raise ModelError(f"the fake model failed as asked after {self.fail_after} calls")
        self.history.append(request)
        if self.call_log:
            _append_line(self.call_log, canonical_json(request.key_material()))
        if self.delay:
            time.sleep(self.delay)
        if self.queue:
            text = self.queue.pop(0)
        else:
            seed = xxhash.xxh3_64_intdigest(canonical_json([self.variant, request.key_material()]).encode())
            rng = random.Random(seed)
            text = canonical_json(instance(request.schema, rng)) if request.schema else f"fake text {seed:x}"
        return Response(text=text, completion_tokens=max(1, len(text) // 4), prompt_tokens=0, seconds=self.delay, finish_reason="stop")


def instance(schema: dict[str, Any], rng: random.Random) -> Any:
    """A valid instance of a bounded JSON schema (the subset treesynth uses)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return {name: instance(prop, rng) for name, prop in schema["properties"].items()}
    if kind == "array":
        low = schema.get("minItems", 0)
        high = schema.get("maxItems", low + 3)
        return [instance(schema["items"], rng) for _ in range(rng.randint(low, high))]
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 100))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0), schema.get("maximum", 100)), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string" and "pattern" in schema:
        # The engine's patterns are short word phrases (engine/schemas.py): one or two words fit both.
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
    if kind == "string":
        text = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randrange(1000)}"
        text = text.ljust(schema.get("minLength", 0), "x")
        return text[: schema.get("maxLength", len(text))]
    raise ValueError(f"fake model cannot make an instance of {schema!r}")


def _append_line(path: str, line: str) -> None:
    """LINE appended to the call log in one write. SIGKILL can cut a write
    short where it crosses a page of the file, leaving a torn line without its
    newline (a request being logged, never answered): this line then starts
    on a line of its own, and the torn one stays torn, not glued to it."""
    data = (line + "\n").encode("utf-8")
    with open(path, "a+b") as log:
        end = log.seek(0, os.SEEK_END)
        if end:
            log.seek(end - 1)
            if log.read(1) != b"\n":
                data = b"\n" + data
        log.write(data)  # append mode: at the end, wherever the read left the position
