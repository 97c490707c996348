"""The sample spec: the JSON schema of one sample, checked and bounded when a
run starts, and the finishing step each leaf sample goes through before it is
stored.

What a sample schema may contain: the subset that the grammar enforces
exactly, so that every stored sample validates against the schema.

- The sample is an ``object`` with ``properties``; ``required`` lists the
  fields every sample has (absent: all of them, with a warning);
  ``additionalProperties`` is false (absent: set to false, which is stricter,
  so samples still validate against the schema as written).
- A field is a ``string`` (minLength, maxLength, pattern, format), an
  ``integer`` or ``number`` (minimum, maximum, exclusiveMinimum,
  exclusiveMaximum, multipleOf), a ``boolean``, an ``enum`` or ``const`` of
  strings, numbers or booleans, an ``array`` (items, minItems, maxItems), or
  an ``object`` under the same rules as the sample. Objects nest at most
  ``MAX_NESTING`` levels below the sample (a list of objects counts one):
  deeper records are better flattened into fields.
- Annotations are accepted anywhere: title, description, default, examples,
  $comment; at the top also $schema and $id.

Bounds: a small model left unbounded can loop until max_tokens. A string
without maxLength gets ``DEFAULT_MAX_LENGTH`` characters, an array without
maxItems gets ``DEFAULT_MAX_ITEMS`` items, each with a warning. Numbers are
left as written.

Anything else (anyOf, oneOf, allOf, not, $ref, $defs, if/then/else,
patternProperties, uniqueItems, prefixItems, null, a list of types, ...) is a
ConfigError naming the construct and where it is."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

from treesynth.engine.config import ConfigError
from treesynth.store.keys import derive_seed

DEFAULT_MAX_LENGTH = 500
DEFAULT_MAX_ITEMS = 10
MAX_NESTING = 2

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment"})
TOP_ONLY = frozenset({"$schema", "$id"})
KEYWORDS = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "string": frozenset({"type", "minLength", "maxLength", "pattern", "format", "enum", "const"}),
    "integer": frozenset({"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const"}),
    "number": frozenset({"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const"}),
    "boolean": frozenset({"type", "enum", "const"}),
    "array": frozenset({"type", "items", "minItems", "maxItems"}),
    None: frozenset({"enum", "const"}),  # an enum or const without a type
}
SCALAR_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}
TYPES = ", ".join(t for t in KEYWORDS if t)


def check_sample_schema(schema: Any) -> tuple[dict[str, Any], list[str]]:
    """The schema with bounds added where they were missing, and one warning
    per bound added; ConfigError for anything the engine cannot enforce."""
    if not isinstance(schema, dict):
        raise ConfigError("must be a JSON schema object (a table), not " + type(schema).__name__)
    checked = copy.deepcopy(schema)
    warnings: list[str] = []
    if checked.get("type") != "object":
        raise ConfigError('the sample must be of "type": "object"')
    _object(checked, "", 0, warnings, top=True)
    _check_with_grammar(checked)
    return checked, warnings


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def _unsupported(node: dict[str, Any], path: str, kind: str | None, top: bool = False) -> None:
    allowed = KEYWORDS[kind] | ANNOTATIONS | (TOP_ONLY if top else frozenset())
    for key in node:
        if key not in allowed:
            what = f"{'an' if kind in ('object', 'array', 'integer') else 'a'} {kind or 'enum'} field"
            raise ConfigError(f"{_at(path)}{key!r} is not supported in {what} (supported: {', '.join(sorted(KEYWORDS[kind]))})")


def _object(node: dict[str, Any], path: str, nesting: int, warnings: list[str], top: bool = False) -> None:
    _unsupported(node, path, "object", top)
    properties = node.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise ConfigError(f"{_at(path)}an object needs \"properties\" with at least one field")
    required = node.get("required")
    if required is None:
        node["required"] = list(properties)
        warnings.append(f"{_at(path)}no \"required\" list; every field made required")
    elif not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ConfigError(f"{_at(path)}\"required\" must be a list of field names")
    else:
        unknown = [r for r in required if r not in properties]
        if unknown:
            raise ConfigError(f"{_at(path)}\"required\" names {', '.join(map(repr, unknown))}, not among its properties")
    extra = node.get("additionalProperties", False)
    if extra is not False:
        raise ConfigError(f"{_at(path)}\"additionalProperties\" must be false (a sample has exactly its listed fields)")
    node["additionalProperties"] = False
    for name, prop in properties.items():
        _field(prop, _where(path, f"properties.{name}"), nesting, warnings)


def _field(node: Any, path: str, nesting: int, warnings: list[str]) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{_at(path)}must be a schema object (a table)")
    kind = node.get("type")
    if isinstance(kind, list):
        raise ConfigError(f"{_at(path)}a list of types is not supported; give one of {TYPES}")
    if kind is None and "enum" not in node and "const" not in node:
        raise ConfigError(f"{_at(path)}no \"type\"; give one of {TYPES}, or an \"enum\"")
    if kind == "null":
        raise ConfigError(f"{_at(path)}type \"null\" is not supported; use an empty string, or leave the field out of \"required\"")
    if kind is not None and kind not in KEYWORDS:
        raise ConfigError(f"{_at(path)}type {kind!r} is not supported; give one of {TYPES}")
    if kind == "object":
        if nesting >= MAX_NESTING:
            raise ConfigError(f"{_at(path)}objects nest at most {MAX_NESTING} levels below the sample; flatten it into fields")
        _object(node, path, nesting + 1, warnings)
        return
    _unsupported(node, path, kind)
    if "enum" in node or "const" in node:
        _enum(node, path, kind)
    elif kind == "string":
        _bounds(node, path, "minLength", "maxLength", DEFAULT_MAX_LENGTH, "characters", warnings)
    elif kind == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            raise ConfigError(f"{_at(path)}an array needs \"items\": one schema for every item (tuples are not supported)")
        _bounds(node, path, "minItems", "maxItems", DEFAULT_MAX_ITEMS, "items", warnings)
        _field(items, f"{path}.items", nesting, warnings)
    elif kind in ("integer", "number"):
        low, high = node.get("minimum"), node.get("maximum")
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if key in node and (isinstance(node[key], bool) or not isinstance(node[key], (int, float))):
                raise ConfigError(f"{_at(path)}{key!r} must be a number")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{_at(path)}minimum {low} is above maximum {high}")


def _enum(node: dict[str, Any], path: str, kind: str | None) -> None:
    values = node["enum"] if "enum" in node else [node["const"]]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{_at(path)}\"enum\" must be a non-empty list")
    for value in values:
        if value is None or not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{_at(path)}enum value {json.dumps(value)} is not a string, number or boolean")
        if kind in SCALAR_TYPES and not (
            isinstance(value, SCALAR_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))
        ):
            raise ConfigError(f"{_at(path)}enum value {json.dumps(value)} is not of type {kind}")
    if len({json.dumps(v) for v in values}) != len(values):
        raise ConfigError(f"{_at(path)}\"enum\" repeats a value")


def _bounds(node: dict[str, Any], path: str, low_key: str, high_key: str, default: int, unit: str, warnings: list[str]) -> None:
    for key in (low_key, high_key):
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{_at(path)}{key!r} must be a whole number >= 0")
    low = node.get(low_key, 0)
    if high_key not in node:
        node[high_key] = max(default, low)
        warnings.append(f"{_at(path)}no {high_key}; bounded to {node[high_key]} {unit}")
    elif node[high_key] < 1:
        raise ConfigError(f"{_at(path)}{high_key} must be at least 1")
    if low > node[high_key]:
        raise ConfigError(f"{_at(path)}{low_key} {low} is above {high_key} {node[high_key]}")


def _check_with_grammar(schema: dict[str, Any]) -> None:
    """What passed the checks above must also compile to a grammar (a bad
    regex pattern or format fails here, before any model is loaded)."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        problem = llguidance.LLMatcher.validate_grammar(grammar, None)
    except Exception as error:  # llguidance raises plain exceptions for bad input
        problem = str(error)
    if problem:
        raise ConfigError(f"the constraint engine refuses it: {problem.strip().splitlines()[0]}")


# -- finishing a sample --------------------------------------------------------


def check_shuffle_choices(schema: dict[str, Any], choices: str, label: str) -> int:
    """The number of choices k, or ConfigError: ``choices`` must be an array
    field of exactly k items and ``label`` an enum field of k values (the
    i-th value names the i-th position), both required."""
    properties = schema["properties"]
    for name in (choices, label):
        if name not in properties:
            raise ConfigError(f"shuffle_choices: {name!r} is not a field of the sample schema")
        if name not in schema.get("required", []):
            raise ConfigError(f"shuffle_choices: field {name!r} must be required")
    array = properties[choices]
    k = array.get("maxItems")
    if array.get("type") != "array" or k is None or array.get("minItems") != k or k < 2:
        raise ConfigError(f"shuffle_choices: {choices!r} must be an array field with minItems = maxItems >= 2")
    labels = properties[label].get("enum")
    if not isinstance(labels, list) or len(labels) != k:
        raise ConfigError(f"shuffle_choices: {label!r} must be an enum field with exactly {k} values, one per position")
    return k


def choice_position(run_seed: int, leaf: str, call: int, index: int, k: int) -> int:
    """Where the correct choice of sample ``index`` of leaf call ``call`` goes.

    The samples of a call are taken in groups of k; each group gets a seeded
    permutation of the k positions, so within every whole group each position
    holds the correct choice exactly once, and a call of a multiple of k
    samples is exactly balanced. Depends only on (run seed, leaf, call,
    index): a resumed run places every sample as an uninterrupted one did."""
    positions = list(range(k))
    random.Random(derive_seed(run_seed, leaf, f"shuffle_choices:{call}", index // k)).shuffle(positions)
    return positions[index % k]


def shuffle_choices(sample: dict[str, Any], choices: str, label: str, labels: list, position: int) -> dict[str, Any]:
    """The sample with its correct choice moved to ``position`` (the other
    choices keep their order) and its label naming that position."""
    options = sample.get(choices)
    if not isinstance(options, list) or len(options) != len(labels) or sample.get(label) not in labels:
        return sample  # cannot happen under the grammar; leave a sample we cannot read as it is
    correct = options[labels.index(sample[label])]
    others = [o for i, o in enumerate(options) if i != labels.index(sample[label])]
    others.insert(position, correct)
    return {**sample, choices: others, label: labels[position]}


def finish_sample(config, sample: dict[str, Any], leaf: str, call: int, index: int) -> dict[str, Any]:
    """A leaf sample as it is stored: the task's finishing rules applied
    (today: shuffle_choices). A pure function of the config, the sample and
    its place (leaf key, call, index)."""
    rule = config.shuffle_choices
    if rule is None:
        return sample
    labels = config.sample_schema["properties"][rule.label]["enum"]
    position = choice_position(config.seed, leaf, call, index, len(labels))
    return shuffle_choices(sample, rule.choices, rule.label, labels, position)
