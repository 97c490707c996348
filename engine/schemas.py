"""Output schemas of every step, in one place. Every string and array is
bounded: unbounded schemas let a small model loop until max_tokens.

Dimensions and values are short word phrases by grammar, not by hope: one to
four words, each of letters (hyphens and apostrophes inside) or a number,
single spaces between them, no dots, brackets, slashes, quotes or braces. A dimension starts with a
letter. A 135M model left free wrote dimensions such as ``[1],`` and values
such as ``json.JSON`` or ``{{value}}}``; under this pattern it cannot."""

from __future__ import annotations

import json
from typing import Any

# A word is letters (with hyphens and apostrophes) or a number, never both:
# a 135M model otherwise numbers its values (forecast5, forecast6, ...).
# At most two hyphens a word: "Math-B-Tech-A-B-C-E-" is not a category.
LETTERS = r"[A-Za-z][A-Za-z']{0,14}(?:-[A-Za-z][A-Za-z']{0,14}){0,2}"
WORD = rf"(?:{LETTERS}|[0-9]{{1,6}})"
VALUE_PATTERN = rf"^{WORD}( {WORD}){{0,3}}$"
DIMENSION_PATTERN = rf"^{LETTERS}( {WORD}){{0,3}}$"
COVERAGE_MAX_NEW = 10
COVERAGE_STATUSES = ("complete", "infinite", "null")


def value_schema() -> dict[str, Any]:
    return {"type": "string", "pattern": VALUE_PATTERN}


def dimension_schema() -> dict[str, Any]:
    return {"type": "string", "pattern": DIMENSION_PATTERN}


def samples_schema(sample_schema: dict[str, Any], n: int) -> dict[str, Any]:
    """Several samples in one answer: a JSON array of exactly n samples."""
    return {"type": "array", "items": sample_schema, "minItems": n, "maxItems": n}


def request_schema(sample_schema: dict[str, Any], n: int) -> dict[str, Any]:
    """What one pivot or leaf request answers: the sample itself when it asks
    for one (the default), an array of n samples otherwise."""
    return sample_schema if n == 1 else samples_schema(sample_schema, n)


def criterion_schema(n: int) -> dict[str, Any]:
    """One new dimension and exactly one value per pivot: exhaustive and
    mutually exclusive by construction (the paper's attribute->indices map can
    miss or repeat indices)."""
    return {
        "type": "object",
        "properties": {
            "dimension": dimension_schema(),
            "labels": {"type": "array", "items": value_schema(), "minItems": n, "maxItems": n},
        },
        "required": ["dimension", "labels"],
        "additionalProperties": False,
    }


def coverage_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": list(COVERAGE_STATUSES)},
            "new_values": {"type": "array", "items": value_schema(), "maxItems": COVERAGE_MAX_NEW},
        },
        "required": ["status", "new_values"],
        "additionalProperties": False,
    }


def parse_samples(text: str, n: int) -> list[dict[str, Any]] | None:
    """The samples of an answer to ``request_schema(..., n)`` or
    ``samples_schema(..., n)``: one object (n = 1) or an array of n non-empty
    objects; None for anything else."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    samples = [answer] if n == 1 and isinstance(answer, dict) else answer
    if not isinstance(samples, list) or len(samples) != n or not all(isinstance(s, dict) and s for s in samples):
        return None
    return samples
