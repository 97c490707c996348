"""What a schema cannot check: a criterion's dimension is new on the path,
its values are distinct, specific and single; coverage values are deduplicated."""

from __future__ import annotations

import re
import string
from typing import Iterable, Sequence

CATCH_ALL = frozenset(
    {"other", "others", "misc", "miscellaneous", "general", "na", "none", "unknown", "various", "mixed", "etc"}
)
_COMBINED = re.compile(r"/|&|\+|\band\b|\bor\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    """Compare-form of a name: case, spaces and punctuation do not count."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def clean(text: str) -> str:
    """Display-form of a value: trimmed, single spaces."""
    return " ".join(text.split())


def dedupe_values(existing: Sequence[str], new: Iterable[str]) -> list[str]:
    """The values of ``new`` not already in ``existing`` (nor repeated), in order, cleaned."""
    seen = {normalise(v) for v in existing}
    added = []
    for value in new:
        key = normalise(value)
        if key and key not in seen:
            seen.add(key)
            added.append(clean(value))
    return added


def criterion_problem(dimension: str, labels: Sequence[str], used_dimensions: Sequence[str]) -> str | None:
    """Why a criterion answer is unusable, or None if it is usable."""
    key = normalise(dimension)
    if not key:
        return "empty dimension name"
    if key in {normalise(d) for d in used_dimensions}:
        return f"dimension {dimension!r} is already used on the path"
    for label in labels:
        if normalise(label) in CATCH_ALL or label.strip().lower() in {"n/a", "n.a."}:
            return f"catch-all value {label!r}"
        if _COMBINED.search(label):
            return f"combined value {label!r}"
        if not normalise(label):
            return "empty value"
    if len({normalise(label) for label in labels}) < 2:
        return "fewer than two distinct values"
    return None
