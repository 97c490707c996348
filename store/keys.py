"""Canonical JSON and content keys: a contract, stored in every store.

- Canonical JSON is ``json.dumps(value, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False)`` encoded as UTF-8.
- A key is ``"xxh3:" + xxh3_128(canonical JSON).hexdigest()``: the algorithm
  travels with the hash, so a later change of algorithm cannot be mistaken
  for a mismatch.
- A node's key includes its parent's key; a call's key includes the model
  fingerprint, the messages, the schema, the sampling parameters and the seed.
- A seed is the low 31 bits of xxh3_64 over the canonical JSON of
  (run seed, node key, step, attempt): never a counter, never call order.
"""

from __future__ import annotations

import json
from typing import Any

import xxhash

KEY_PREFIX = "xxh3:"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_key(value: Any) -> str:
    return KEY_PREFIX + xxhash.xxh3_128_hexdigest(canonical_json(value).encode("utf-8"))


def derive_seed(run_seed: int, node_key: str, step: str, attempt: int) -> int:
    data = canonical_json([run_seed, node_key, step, attempt]).encode("utf-8")
    return xxhash.xxh3_64_intdigest(data) & 0x7FFFFFFF


def call_key(fingerprint: dict[str, Any], request: dict[str, Any]) -> str:
    """A model call's key: the model fingerprint and the request's key material."""
    return content_key({"model": fingerprint, "request": request})


def root_key() -> str:
    return content_key(["root"])


def child_key(parent_key: str, dimension: str, value: str | None) -> str:
    return content_key([parent_key, dimension, value])


def node_key(parent: str | None, dimension: str | None = None, value: Any = None) -> str:
    """A node's key: the root's, or a child's from its parent's key and its
    attribute (an infinite dimension's value list as canonical JSON)."""
    if parent is None:
        return root_key()
    return child_key(parent, dimension, canonical_json(value) if isinstance(value, list) else value)
