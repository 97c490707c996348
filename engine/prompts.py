"""Prompts are data: templates here, rendered by pure functions.

Every prompt names the task and the subspace: the (dimension, value) pairs on
the node's path, with an infinite dimension's value already drawn."""

from __future__ import annotations

import json
from typing import Any, Sequence

from treesynth.engine.schemas import COVERAGE_MAX_NEW

SYSTEM = "You are a careful data designer. You answer only with JSON."

PIVOTS = """Task: {description}
{subspace}
Write {n} varied samples of this data, as different from each other as possible while staying inside the subspace.
Each sample is a JSON object with these fields: {fields}.
Answer with a JSON array of exactly {n} samples."""

CRITERION = """Task: {description}
{subspace}
Here are {n} samples of this subspace:
{numbered_pivots}

Dimensions already used: {used_dimensions}.
Name ONE new dimension along which these samples differ, one that splits this data space into clear, non-overlapping categories.
Then give each of the {n} samples, in order, its value on that dimension: a short, specific category name.
Never use catch-all values such as "other" or "general", and never combine two values with "/" or "and".
Answer as JSON: {{"dimension": "...", "labels": [{n} values, one per sample]}}."""

COVERAGE = """Task: {description}
{subspace}
Dimension: {dimension}
Values so far: {values}.
Are values of this dimension missing from the list? Answer as JSON with "status" and "new_values":
- "complete": the list is finished by your new values (give them, up to {max_new});
- "infinite": this dimension has too many values to list; give up to {max_new} new ones;
- "null": the list already covers the dimension (give no new values)."""

LEAF = """Task: {description}
{subspace}
Write {n} new, varied samples of this data. Every sample must satisfy every constraint above.
Each sample is a JSON object with these fields: {fields}.
Answer with a JSON array of exactly {n} samples."""

TEMPLATES = {"pivots": PIVOTS, "criterion": CRITERION, "coverage": COVERAGE, "leaf": LEAF}


def render_subspace(attributes: Sequence[tuple[str, str]]) -> str:
    if not attributes:
        return "Subspace: the whole data space."
    lines = "\n".join(f"- {dimension}: {value}" for dimension, value in attributes)
    return "Subspace constraints (all must hold):\n" + lines


def describe_fields(sample_schema: dict[str, Any]) -> str:
    parts = []
    for name, prop in sample_schema["properties"].items():
        hint = prop.get("description") or prop.get("type", "value")
        parts.append(f'"{name}" ({hint})')
    return ", ".join(parts)


def _messages(user: str) -> tuple[tuple[str, str], ...]:
    return (("system", SYSTEM), ("user", user))


def pivots_messages(description, attributes, sample_schema, n, template=PIVOTS):
    return _messages(
        template.format(
            description=description, subspace=render_subspace(attributes), n=n, fields=describe_fields(sample_schema)
        )
    )


def criterion_messages(description, attributes, pivots: Sequence[dict], used_dimensions: Sequence[str], template=CRITERION):
    numbered = "\n".join(f"{i}. {json.dumps(p, ensure_ascii=False)}" for i, p in enumerate(pivots, 1))
    return _messages(
        template.format(
            description=description,
            subspace=render_subspace(attributes),
            n=len(pivots),
            numbered_pivots=numbered,
            used_dimensions=", ".join(used_dimensions) if used_dimensions else "none",
        )
    )


def coverage_messages(description, attributes, dimension: str, values: Sequence[str], template=COVERAGE):
    return _messages(
        template.format(
            description=description,
            subspace=render_subspace(attributes),
            dimension=dimension,
            values=", ".join(values),
            max_new=COVERAGE_MAX_NEW,
        )
    )


def leaf_messages(description, attributes, sample_schema, n, template=LEAF):
    return _messages(
        template.format(
            description=description, subspace=render_subspace(attributes), n=n, fields=describe_fields(sample_schema)
        )
    )
