"""Prompts are data: templates here, rendered by pure functions.

Every prompt names the task and the subspace: the (dimension, value) pairs on
the node's path, with an infinite dimension's value already drawn.

A task file may override the template of any step in its ``[prompts]`` table
(keys ``pivots``, ``criterion``, ``coverage``, ``leaf``). A template is a
Python format string over the step's placeholders (``PLACEHOLDERS``); write a
literal brace as ``{{`` or ``}}``. ``check_template`` refuses an unknown
placeholder, a missing required one and a malformed template when the config
is built, before any model call."""

from __future__ import annotations

import json
from string import Formatter
from typing import Any, Sequence

from treesynth.engine.config import ConfigError
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

# The placeholders each step's template may use, with what they hold.
_TASK = {
    "description": "the task's description (the data space, in one sentence)",
    "subspace": "the node's subspace: its path's (dimension, value) pairs as a list, or 'the whole data space'",
}
_SAMPLES = {
    "n": "how many samples to write (the answer's schema asks for exactly this many)",
    "fields": "the sample fields with their descriptions, from the sample schema",
}
PLACEHOLDERS: dict[str, dict[str, str]] = {
    "pivots": {**_TASK, **_SAMPLES},
    "criterion": {
        **_TASK,
        "n": "how many pivot samples there are",
        "numbered_pivots": "the pivot samples as JSON, one per line, numbered from 1",
        "used_dimensions": "the dimensions already used on the path, comma-separated, or 'none'",
    },
    "coverage": {
        **_TASK,
        "dimension": "the dimension being covered",
        "values": "its values so far, comma-separated",
        "max_new": f"the most new values one answer may give ({COVERAGE_MAX_NEW})",
    },
    "leaf": {**_TASK, **_SAMPLES},
}
# Without these a step cannot do its job: a leaf that never sees its subspace
# writes the same samples in every leaf.
REQUIRED: dict[str, tuple[str, ...]] = {
    "pivots": ("subspace",),
    "criterion": ("numbered_pivots",),
    "coverage": ("dimension", "values"),
    "leaf": ("subspace",),
}
_EXAMPLE_VALUES = {"n": 3, "max_new": COVERAGE_MAX_NEW}


def _placeholders(template: str) -> list[str]:
    names = []
    for _, name, spec, _ in Formatter().parse(template):
        if name is not None:
            names.append(name)
        if spec:
            names += _placeholders(spec)
    return names


def check_template(step: str, template: str) -> None:
    """Refuse a template that could not be rendered for ``step``: ConfigError naming the problem."""
    where = f"prompts.{step}"
    known = PLACEHOLDERS[step]
    try:
        names = _placeholders(template)
    except ValueError as error:
        raise ConfigError(f"{where}: not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    for name in names:
        if name not in known:
            shown = "{" + name + "}" if name else "{}"
            raise ConfigError(f"{where}: unknown placeholder {shown}; known: {', '.join(known)}")
    missing = [name for name in REQUIRED[step] if name not in names]
    if missing:
        raise ConfigError(f"{where}: the template must contain {', '.join('{' + m + '}' for m in missing)}")
    try:  # a format spec or conversion that cannot apply to the value fails here, not mid-run
        template.format(**{name: _EXAMPLE_VALUES.get(name, name) for name in known})
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ConfigError(f"{where}: cannot be rendered: {error}") from None


def placeholder_help() -> str:
    """The placeholders of every step, as text for the documentation and `preset show`."""
    lines = []
    for step, names in PLACEHOLDERS.items():
        lines.append(f"[prompts] {step} (must contain {', '.join('{' + r + '}' for r in REQUIRED[step])}):")
        lines += [f"  {{{name}}}: {doc}" for name, doc in names.items()]
    return "\n".join(lines)


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


def pivots_messages(description, attributes, sample_schema, n, template: str | None = None):
    return _messages(
        (template or PIVOTS).format(
            description=description, subspace=render_subspace(attributes), n=n, fields=describe_fields(sample_schema)
        )
    )


def criterion_messages(description, attributes, pivots: Sequence[dict], used_dimensions: Sequence[str], template: str | None = None):
    numbered = "\n".join(f"{i}. {json.dumps(p, ensure_ascii=False)}" for i, p in enumerate(pivots, 1))
    return _messages(
        (template or CRITERION).format(
            description=description,
            subspace=render_subspace(attributes),
            n=len(pivots),
            numbered_pivots=numbered,
            used_dimensions=", ".join(used_dimensions) if used_dimensions else "none",
        )
    )


def coverage_messages(description, attributes, dimension: str, values: Sequence[str], template: str | None = None):
    return _messages(
        (template or COVERAGE).format(
            description=description,
            subspace=render_subspace(attributes),
            dimension=dimension,
            values=", ".join(values),
            max_new=COVERAGE_MAX_NEW,
        )
    )


def leaf_messages(description, attributes, sample_schema, n, template: str | None = None):
    return _messages(
        (template or LEAF).format(
            description=description, subspace=render_subspace(attributes), n=n, fields=describe_fields(sample_schema)
        )
    )
