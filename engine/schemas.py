"""Output schemas of every step, in one place. Every string and array is
bounded: unbounded schemas let a small model loop until max_tokens."""

from __future__ import annotations

from typing import Any

VALUE_MAX_CHARS = 60
COVERAGE_MAX_NEW = 10
COVERAGE_STATUSES = ("complete", "infinite", "null")


def _short_string() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": VALUE_MAX_CHARS}


def samples_schema(sample_schema: dict[str, Any], n: int) -> dict[str, Any]:
    """Pivot samples and leaf samples: a JSON array of exactly n samples."""
    return {"type": "array", "items": sample_schema, "minItems": n, "maxItems": n}


def criterion_schema(n: int) -> dict[str, Any]:
    """One new dimension and exactly one value per pivot: exhaustive and
    mutually exclusive by construction (the paper's attribute->indices map can
    miss or repeat indices)."""
    return {
        "type": "object",
        "properties": {
            "dimension": _short_string(),
            "labels": {"type": "array", "items": _short_string(), "minItems": n, "maxItems": n},
        },
        "required": ["dimension", "labels"],
        "additionalProperties": False,
    }


def coverage_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": list(COVERAGE_STATUSES)},
            "new_values": {"type": "array", "items": _short_string(), "maxItems": COVERAGE_MAX_NEW},
        },
        "required": ["status", "new_values"],
        "additionalProperties": False,
    }
