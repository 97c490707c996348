"""What a schema cannot check.

Criterion answers: the dimension is new on the path and names a real
property; its values are distinct, specific, single categories. Coverage
values pass the same value rules, deduplicated. Samples: no template debris,
no runs of digits and symbols, no talk of the answer format.

Every rule is a pure function of its inputs, part of the content contract
(engine/contract.py): changing one changes what a run keeps."""

from __future__ import annotations

import re
import string
import unicodedata
import zlib
from typing import Any, Iterable, Iterator, Sequence

CATCH_ALL = frozenset(
    {"other", "others", "misc", "miscellaneous", "general", "na", "none", "unknown", "various", "mixed", "etc",
     "any", "all", "default", "generic", "standard", "normal", "regular", "random", "something", "anything"}
)
# A dimension must name a property, not restate that there is one.
VAGUE_DIMENSIONS = frozenset(
    {"type", "types", "kind", "kinds", "category", "categories", "class", "group", "dimension", "attribute",
     "feature", "aspect", "variable", "property", "option", "thing", "things", "label", "tag"}
)
# Words about the answer's format rather than the task's content. A dimension,
# value or sample that uses one is rejected unless the task itself does.
FORMAT_WORDS = frozenset(
    {"json", "sample", "samples", "data", "dataset", "text", "texts", "field", "fields", "value", "values",
     "dimension", "dimensions", "label", "labels", "example", "examples", "item", "items", "string", "strings",
     "array", "arrays", "object", "objects", "key", "keys", "list", "format", "index", "placeholder", "schema",
     "null", "true", "false"}
)
# Names of dimensions, which are no group of anything: `setting = mood` and
# `level = moods` came from the 135M model copying the examples' dimensions.
FACET_NAMES = frozenset(
    {"topic", "mood", "setting", "audience", "difficulty", "meal", "tone", "style", "theme", "genre", "purpose"}
)
# Format words a sample may not use (a subset: "list", "text", "example" are
# ordinary words inside a product review or a math problem).
SAMPLE_FORMAT_WORDS = frozenset({"json", "schema", "placeholder", "array", "arrays", "dataset"})
_COMBINED = re.compile(r"/|&|\+|\band\b|\bor\b|\bvs\b|\bversus\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_PLACEHOLDER = re.compile(r"\{[^{}\s]{0,40}\}|\{\{|\}\}|<[a-z_]+>|\$\{|\[[A-Za-z][A-Za-z_ ]{0,30}\]")
_KEY_VALUE = re.compile(r'"\w+"\s*:')
_WORD = re.compile(r"[^\W\d_]+|\d+")


def normalise(text: str) -> str:
    """Compare-form of a name: case, spaces and punctuation do not count."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def clean(text: str) -> str:
    """Display-form of a value: trimmed, single spaces."""
    return " ".join(text.split())


def words_of(text: str) -> list[str]:
    return normalise(text).split()


_SUFFIXES = ("ations", "ation", "ness", "ings", "ing", "ment", "ful", "ies", "ied", "ed", "es", "ly", "y", "s")


def stem(word: str) -> str:
    """A crude stem, enough to see that sad / sadness / sadly, relaxing /
    relaxation or challenge / challenging name one group: the word less its
    longest common suffix, then less a final e, never shorter than three letters."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _extends(shorter: list[str], longer: list[str]) -> bool:
    return len(shorter) < len(longer) and longer[: len(shorter)] == shorter


def same_group(a: list[str], b: list[str]) -> bool:
    """Two values (as word lists) that name one group: equal, one extending
    the other, or equal word for word after stemming."""
    return a == b or _extends(a, b) or _extends(b, a) or [stem(w) for w in a] == [stem(w) for w in b]


def _only_task_words(words: list[str], task_words: frozenset[str]) -> bool:
    """Every word (stemmed) is a word of the task: ``math word problem`` for
    GSM8K word problems names the whole data space, not a part of it."""
    stems = {stem(w) for w in task_words}
    return bool(words) and all(stem(w) in stems for w in words)


def value_problem(value: str, dimension: str, task_words: frozenset[str], echo: str) -> str | None:
    """Why one value (of ``dimension``) is unusable, or None.

    ``task_words``: the words of the task description (a format word the task
    uses is allowed); ``echo``: the normalised instruction text of the prompt
    the value answered, so that a value copied from our own wording is caught."""
    key = normalise(value)
    if not key:
        return "empty value"
    words = key.split()
    if key in CATCH_ALL or value.strip().lower() in {"n/a", "n.a."}:
        return f"catch-all value {value!r}"
    if _COMBINED.search(value):
        return f"combined value {value!r}"
    format_words = [w for w in words if w in FORMAT_WORDS and w not in task_words]
    if format_words:
        return f"value {value!r} speaks of the format ({format_words[0]})"
    dimension_words = words_of(dimension)
    if dimension_words and all(w in words for w in dimension_words):
        return f"value {value!r} repeats the dimension"
    echo_words = set(echo.split())
    if all(w in echo_words and w not in task_words for w in words):
        return f"value {value!r} echoes the prompt"
    if _only_task_words(words, task_words):
        return f"value {value!r} only repeats the task"
    if not any(c.isalpha() for c in value):
        return f"value {value!r} is a bare number"
    return None


def dimension_problem(dimension: str, used_dimensions: Sequence[str], task_words: frozenset[str], echo: str) -> str | None:
    key = normalise(dimension)
    if not key:
        return "empty dimension name"
    words = key.split()
    if key in {normalise(d) for d in used_dimensions}:
        return f"dimension {dimension!r} is already used on the path"
    if key in CATCH_ALL or key in VAGUE_DIMENSIONS:
        return f"catch-all dimension {dimension!r}"
    format_words = [w for w in words if w in FORMAT_WORDS and w not in task_words]
    if format_words:
        return f"dimension {dimension!r} speaks of the format ({format_words[0]})"
    echo_words = set(echo.split())
    if all(w in echo_words and w not in task_words for w in words):
        return f"dimension {dimension!r} echoes the prompt"
    if _only_task_words(words, task_words):
        return f"dimension {dimension!r} only repeats the task"
    return None


def values_problem(values: Sequence[str]) -> str | None:
    """What is wrong with a set of values together: fewer than two distinct,
    or two naming one group (``json`` / ``json json``, ``sad`` / ``sadness``)."""
    distinct = list(dict.fromkeys(normalise(v) for v in values))
    if len(distinct) < 2:
        return "fewer than two distinct values"
    split = [d.split() for d in distinct]
    for i, a in enumerate(split):
        for b in split[i + 1 :]:
            if same_group(a, b):
                return f"values {' '.join(a)!r} and {' '.join(b)!r} name one group"
    return None


def criterion_problem(
    dimension: str, labels: Sequence[str], used_dimensions: Sequence[str],
    task_words: frozenset[str] = frozenset(), echo: str = "",
) -> str | None:
    """Why a criterion answer is unusable, or None if it is usable."""
    problem = dimension_problem(dimension, used_dimensions, task_words, echo)
    if problem:
        return problem
    for label in labels:
        problem = value_problem(label, dimension, task_words, echo)
        if problem:
            return problem
    return values_problem(labels)


def copied_problem(values: Sequence[str], example_words: frozenset[str], own_words: frozenset[str]) -> str | None:
    """Half or more of the distinct values made only of words from the
    prompt's examples (and not from the task or its pivots): a lazy copy."""
    distinct = list(dict.fromkeys(normalise(v) for v in values))
    copied = [v for v in distinct if all(w in example_words and w not in own_words for w in v.split())]
    if distinct and 2 * len(copied) >= len(distinct):
        return f"values copied from the examples ({', '.join(copied[:3])})"
    return None


def path_value_problem(values: Sequence[str], path: Sequence[Sequence]) -> str | None:
    """A value that is already a value on the node's path (``food`` under
    ``product = food``), or that names a dimension, one on the path or a
    facet name (``setting = mood``, ``level = moods``), not a group."""
    on_path = {normalise(v) for _, value in path for v in (value if isinstance(value, list) else [value])}
    dimensions = {stem(w) for dimension, _ in path for w in words_of(dimension)} | {stem(w) for w in FACET_NAMES}
    for value in values:
        if normalise(value) in on_path:
            return f"value {value!r} is already on the path"
        words = words_of(value)
        if len(words) == 1 and stem(words[0]) in dimensions:
            return f"value {value!r} names a dimension, not a group"
    return None


def usable_values(existing: Sequence[str], new: Iterable[str], dimension: str, task_words: frozenset[str], echo: str) -> list[str]:
    """The values of ``new`` that pass the value rules, are not already in
    ``existing`` (nor repeated) and neither extend nor are extended by a value
    kept so far; in order, cleaned."""
    kept = [words_of(v) for v in existing]
    added = []
    for value in new:
        words = words_of(value)
        if not words or value_problem(value, dimension, task_words, echo):
            continue
        if any(same_group(words, k) for k in kept):
            continue
        kept.append(words)
        added.append(clean(value))
    return added


# A task whose description uses one of these words has samples where braces
# and "key": pairs are content (code, LaTeX, JSON), not template debris.
MARKUP_WORDS = frozenset(
    {"code", "coding", "programming", "program", "programs", "python", "javascript", "java", "typescript", "sql",
     "latex", "json", "function", "functions", "script", "scripts", "snippet", "snippets", "html", "css", "regex",
     "yaml", "shell", "bash", "c", "rust", "go"}
)


def markup_task(task_words: frozenset[str]) -> bool:
    return bool(task_words & MARKUP_WORDS)


class SampleSchemaValidator:
    """The sample schema's validator, one per run: jsonschema's Draft 2020-12
    validator, built when the first sample is checked. Importing jsonschema
    takes 0.1-0.2 s, which a process that only replays stored calls or builds
    nodes (most restarts of a long run, and every run killed before its
    leaves) never needs."""

    def __init__(self, schema: dict):
        self.schema = schema
        self._validator = None

    def iter_errors(self, instance: Any) -> Iterator[Any]:
        if self._validator is None:
            import jsonschema

            self._validator = jsonschema.Draft202012Validator(self.schema)
        return self._validator.iter_errors(instance)


def schema_problem(validator, sample) -> str | None:
    """Why a decoded sample breaks the sample schema, or None. The grammar
    should make this impossible; a grammar-engine bug must not write invalid
    records silently."""
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(sample))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the sample"
    return f"does not match the sample schema ({where}: {error.validator})"


def sample_problem(text: str, task_words: frozenset[str], dimensions: Sequence[str] = ()) -> str | None:
    """Why a sample's text is not data of the task, or None.

    Template debris (``{name}``, ``{{``, ``<name>``, ``[name]``) and JSON talk
    (``"key":``), unless the task is about code or markup (``MARKUP_WORDS``);
    a format word such as json that the task does not use; mostly digits and
    symbols (under half of its non-space characters are letters, a fifth for
    code and markup tasks); one word
    repeated (four times in a row, or over 40 % of a text of 8 or more words);
    a line of the prompt's properties copied out ("Mood: calm" for a path
    dimension ``mood``); under half of its letters Latin when the task is
    written in Latin letters (a Russian paragraph for an English task); a text
    of 100 or more bytes that zlib compresses below 0.3 of its size (0.2 for
    code and markup tasks): it repeats itself ("GEMEMMEMEMBERE-YAHU..." at
    0.10; plain English texts of the demo and the references: 0.49 or more)."""
    if not markup_task(task_words):
        if _PLACEHOLDER.search(text):
            return "template placeholder"
        if _KEY_VALUE.search(text):
            return "speaks in JSON keys"
    lowered = text.lower()
    for dimension in dimensions:
        if f"{dimension.lower()}:" in lowered:
            return "repeats the prompt's properties"
    tokens = _WORD.findall(lowered)
    spoken = [t for t in tokens if t in SAMPLE_FORMAT_WORDS and t not in task_words]
    if spoken:
        return f"speaks of the format ({spoken[0]})"
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    letters_needed = 0.2 if markup_task(task_words) else 0.5  # code and LaTeX are symbol-heavy by nature
    if not visible or letters < letters_needed * len(visible):
        return "mostly digits or symbols"
    if letters >= 20 and _latin_share("".join(task_words)) >= 0.9 and _latin_share(visible) < 0.5:
        return "written in another script than the task"
    raw = text.encode("utf-8")
    if len(raw) >= 100 and len(zlib.compress(raw, 9)) < (0.2 if markup_task(task_words) else 0.3) * len(raw):
        return "repeats itself"
    words = [t for t in tokens if t.isalpha()]
    run = 1
    for previous, word in zip(words, words[1:]):
        run = run + 1 if word == previous else 1
        if run >= 4:
            return f"repeats {word!r}"
    if len(words) >= 8:
        top = max(words.count(w) for w in set(words))
        if top > 0.4 * len(words):
            return "one word makes up most of it"
    return None


def _latin_share(chars) -> float:
    """The share of the letters among ``chars`` that are Latin (1 when there are none)."""
    letters = [c for c in chars if c.isalpha()]
    if not letters:
        return 1.0
    return sum(1 for c in letters if c.isascii() or unicodedata.name(c, "").startswith("LATIN")) / len(letters)
