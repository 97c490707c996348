"""The content contract: everything of the method that shapes a run's data.

A run's output is a function of its config (hashed in ``runs.config_hash``),
its model (``runs.model``) and the method: the prompt templates, the answer
schemas, the checks that accept or reject an answer, how a criterion is
chosen, how samples are kept or dropped, and the embedder that judges them.
This module gathers the method into one dict, stored with the run
(``runs.method``, hash in ``runs.method_hash``); a run is continued only under
the same method, so a store never mixes answers made two ways.

What it holds: the templates and system prompt as text; the schema patterns
and bounds; the checks' word lists; the source code of the rule functions
(a change of logic is a change of method, even when no constant moved); the
selection rules and the embedder's fingerprint; ``REVISION``, bumped by hand
for a change of the driver that none of the above shows."""

from __future__ import annotations

import inspect
from typing import Any

from treesynth.engine import checks, leaves, prompts, schemas, selection, spec
from treesynth.store.keys import content_key

REVISION = 4  # 1: version 0.1.0 (prompts about JSON, n samples per call, no dedup); 2: one leaf after another; 3: batched rounds (all pivot requests at once, leaves take turns by request index); 4: a value that names a dimension is refused, a sample in another script than the task, or one that zlib compresses below 0.3, is dropped; challenge / challenging name one group

_RULES = (
    checks.value_problem,
    checks.dimension_problem,
    checks.values_problem,
    checks.sample_problem,
    checks._latin_share,
    checks.schema_problem,
    checks.markup_task,
    checks.usable_values,
    checks.copied_problem,
    checks.path_value_problem,
    prompts.criterion_shots,
    prompts.coverage_shots,
    prompts.coverage_shot_words,
    checks.normalise,
    checks.stem,
    checks.same_group,
    checks._only_task_words,
    selection.sample_text,
    selection.label_balance,
    selection.criterion_score,
    selection.SampleFilter.judge,
    leaves.plan_leaves,
    leaves.call_sizes,
    schemas.parse_samples,
    leaves.equal_targets,
    leaves.request_limit,
    leaves.topup_extras,
    leaves.draw_attributes,
    spec.choice_position,
    spec.shuffle_choices,
)


def method(embedder_fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "revision": REVISION,
        "prompts": {
            "system": prompts.SYSTEM,
            **prompts.TEMPLATES,
            "criterion_shots": prompts.CRITERION_SHOTS,
            "coverage_shots": prompts.COVERAGE_SHOTS,
            "pivot_max_chars": prompts.PIVOT_MAX_CHARS,
        },
        "schemas": {
            "value_pattern": schemas.VALUE_PATTERN,
            "dimension_pattern": schemas.DIMENSION_PATTERN,
            "coverage_max_new": schemas.COVERAGE_MAX_NEW,
        },
        "checks": {
            "catch_all": sorted(checks.CATCH_ALL),
            "vague_dimensions": sorted(checks.VAGUE_DIMENSIONS),
            "format_words": sorted(checks.FORMAT_WORDS),
            "sample_format_words": sorted(checks.SAMPLE_FORMAT_WORDS),
            "markup_words": sorted(checks.MARKUP_WORDS),
        },
        "rules": {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}": _source_key(fn) for fn in _RULES},
        "embedder": embedder_fingerprint,
    }


def method_hash(method_dict: dict[str, Any]) -> str:
    return content_key(method_dict)


def _source_key(fn) -> str:
    return content_key(inspect.getsource(fn))


def changed_parts(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Dotted names of the parts that differ ('prompts.leaf', 'rules.checks.value_problem', ...)."""
    if old is None:
        return ["everything (the store was written before the method was recorded)"]
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            parts.append(key)
    return parts
