"""The model protocol.

A request is chat messages plus an optional JSON schema that the answer must
match, with max_tokens, temperature, top_p and a seed. ``generate`` takes a
list of requests so that a backend may decode a whole breadth-first level as
one batch; a response depends only on its own request, never on the others
in the list or on earlier calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import xxhash


# A request's ``schema`` is a JSON schema, or ``{TEXT_PATTERN: regex}``: a
# plain-text answer (not JSON) that must match the regex in full. Small models
# list things far better in the numbered lines they were trained on than
# inside a JSON array.
TEXT_PATTERN = "x-text-pattern"


class ModelError(RuntimeError):
    """The model cannot be loaded or used; the CLI prints it as one line."""


def file_hash(path: Path) -> str:
    """A model file's xxh3-128 digest (fast: about 3 GB/s here), as ``xxh3:<hex>``."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "xxh3:" + h.hexdigest()


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    schema: dict[str, Any] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int

    def key_material(self) -> dict[str, Any]:
        """What a call's cache key is made of, besides the model fingerprint."""
        data = asdict(self)
        data["messages"] = [list(m) for m in self.messages]
        return data


@dataclass
class Response:
    text: str
    completion_tokens: int
    prompt_tokens: int
    seconds: float
    finish_reason: str  # "stop" or "length"
    extra: dict[str, Any] = field(default_factory=dict)


class Model(Protocol):
    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model's outputs: file hash, quantisation, context size, backend version."""
        ...

    def generate(self, requests: Sequence[Request]) -> list[Response]: ...
