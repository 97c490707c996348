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

# Prompts speak only of content. The grammar carries the answer's format, so
# nothing here mentions JSON, arrays, objects or fields: a 135M model told
# "answer only with JSON" writes samples about JSON (measured: 19-40 % of the
# records of version 1462ec0 did).
SYSTEM = "You are a helpful assistant."

PIVOTS = """Write {examples} of the following: {description}
{subspace}{fields}"""

# The criterion is asked as a few-shot conversation: a 135M model told to
# "name a dimension and label each sample" answered with echoes of the prompt
# ("three", "relation" = 1..5); shown two sorted sets from other domains, it
# answers in kind ("mood": disappointed, excited, ...). Each attempt takes two
# other shots (``criterion_shots``), skipping facets already used on the path,
# so the attempts propose different dimensions and the best is kept.
CRITERION = """Sort these {description} into groups.{used_dimensions}
{subspace}
{numbered_pivots}"""

CRITERION_SHOTS: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("news headlines", ("Storm closes schools across the county", "Local team wins the state championship",
                        "New bakery opens on Main Street", "Heat wave expected this weekend"),
     "topic", ("weather", "sports", "business", "weather")),
    ("text messages between friends", ("Can't wait to see you tonight!!", "Ugh, my train is late again",
                                       "Thanks so much for the birthday gift", "Did you finish the homework?"),
     "mood", ("excited", "annoyed", "grateful", "curious")),
    ("travel blog posts", ("We spent three lazy days on the white sand of Koh Lanta.",
                           "The climb to the hut took six hours through snow.",
                           "Tokyo at night is a maze of neon and ramen shops.",
                           "Our cottage looked over sheep fields and a stone wall."),
     "setting", ("beach", "mountains", "city", "countryside")),
    ("workout instructions", ("Walk briskly for ten minutes, then stretch.", "Do five sets of ten pistol squats on each leg.",
                              "Hold a plank for thirty seconds.", "Run 400 m intervals at race pace with 60 s rest."),
     "difficulty", ("beginner", "advanced", "beginner", "advanced")),
    ("work emails", ("Hi Sam, can you send me the slides before our one-on-one?",
                     "Dear Ms. Ortiz, please find the signed contract attached.",
                     "Team, the office is closed on Friday.", "Dear customer, your order has shipped."),
     "audience", ("manager", "client", "coworkers", "customer")),
    ("recipes", ("Overnight oats with berries and honey", "Slow-cooked beef stew with root vegetables",
                 "Lemon tart with a buttery crust", "Chickpea salad wraps for the office"),
     "meal", ("breakfast", "dinner", "dessert", "lunch")),
)


def criterion_shots(attempt: int, used_dimensions: Sequence[str]) -> list[tuple]:
    """The two shots of a criterion attempt: consecutive in the bank from
    2 * attempt, without the facets already used on the path."""
    used = {d.lower() for d in used_dimensions}
    bank = [shot for shot in CRITERION_SHOTS if shot[2] not in used] or list(CRITERION_SHOTS)
    start = (2 * attempt) % len(bank)
    return [bank[start], bank[(start + 1) % len(bank)]]


def shot_words() -> frozenset[str]:
    """Every word of the shots' labels: values a lazy answer copies."""
    from treesynth.engine.checks import words_of

    labels = [label for shot in CRITERION_SHOTS for label in shot[3]]
    labels += [value for shot in COVERAGE_SHOTS for value in shot[2] + shot[4]]
    return frozenset(w for label in labels for w in words_of(label))


# Coverage is few-shot too: two shots whose answers show each status.
COVERAGE = """We sort {description} by {dimension}. The {dimension} groups so far: {values}. Which are missing?
{subspace}"""

COVERAGE_SHOTS: tuple[tuple[str, str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("news headlines", "topic", ("weather", "sports", "business"), "complete", ("politics", "science", "health", "crime")),
    ("text messages between friends", "mood", ("excited", "annoyed", "grateful"), "infinite", ("sad", "proud", "nervous", "bored", "hopeful")),
    ("travel blog posts", "setting", ("beach", "mountains", "city", "countryside"), "complete", ("desert", "lake", "island")),
    ("workout instructions", "difficulty", ("beginner", "intermediate", "advanced"), "null", ()),
)


def coverage_shots(round_: int) -> list[tuple]:
    start = (2 * round_) % len(COVERAGE_SHOTS)
    return [COVERAGE_SHOTS[start], COVERAGE_SHOTS[(start + 1) % len(COVERAGE_SHOTS)]]


def coverage_shot_words(round_: int, dimension: str) -> frozenset[str]:
    """The words of a coverage round's shots about other dimensions than ``dimension``."""
    from treesynth.engine.checks import normalise, words_of

    values = [v for shot in coverage_shots(round_) if shot[1] != normalise(dimension) for v in shot[2] + shot[4]]
    return frozenset(w for v in values for w in words_of(v))


LEAF = """Write {examples} of the following: {description}
{subspace}{fields}"""

TEMPLATES = {"pivots": PIVOTS, "criterion": CRITERION, "coverage": COVERAGE, "leaf": LEAF}

# The placeholders each step's template may use, with what they hold.
_TASK = {
    "description": "the task's description (the data space, in one sentence)",
    "subspace": "the node's subspace: its path's (dimension, value) pairs as lines 'dimension: value', or nothing at the root",
}
_SAMPLES = {
    "n": "how many samples one request asks for (1 by default; the grammar asks for exactly this many)",
    "examples": "'one example', or 'N different examples' when a request asks for N",
    "fields": "what each sample holds, in words (empty when the sample is one text)",
}
PLACEHOLDERS: dict[str, dict[str, str]] = {
    "pivots": {**_TASK, **_SAMPLES},
    "criterion": {
        **_TASK,
        "n": "how many pivot samples there are",
        "numbered_pivots": "the pivot samples as plain text, one per line after '- '",
        "used_dimensions": "' Do not sort them by a or b.' naming the dimensions already used on the path, or nothing",
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
PIVOT_MAX_CHARS = 300  # a pivot shown to the criterion step is cut to this many characters


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
    """The path as lines the model reads as properties; nothing at the root."""
    return "\n".join(f"{dimension[:1].upper()}{dimension[1:]}: {value}" for dimension, value in attributes)


def describe_fields(sample_schema: dict[str, Any]) -> str:
    """What a sample holds, in words: nothing for a sample of one text field;
    otherwise 'Give its question (...), then its answer (...).'"""
    properties = sample_schema["properties"]
    if len(properties) == 1:
        return ""
    parts = []
    for name, prop in properties.items():
        words = name.replace("_", " ")
        hint = prop.get("description")
        parts.append(f"its {words} ({hint})" if hint else f"its {words}")
    return "\nGive " + ", then ".join(parts) + "."


def examples_phrase(n: int) -> str:
    return "one example" if n == 1 else f"{n} different examples"


def pivot_text(sample: dict[str, Any]) -> str:
    """A pivot as the criterion step shows it: its string fields' text, joined, cut."""
    parts = [v for v in sample.values() if isinstance(v, str)] or [json.dumps(sample, ensure_ascii=False)]
    text = " / ".join(" ".join(p.split()) for p in parts)
    return text if len(text) <= PIVOT_MAX_CHARS else text[: PIVOT_MAX_CHARS - 3] + "..."


def _messages(user: str) -> tuple[tuple[str, str], ...]:
    return (("system", SYSTEM), ("user", user))


def _tidy(text: str) -> str:
    # An empty placeholder (the root's subspace, a one-field schema) leaves no blank line behind.
    return "\n".join(line.rstrip() for line in text.split("\n") if line.strip())


def _inline(description: str) -> str:
    """The description inside a sentence: 'Short reviews' -> 'short reviews', 'GSM8K-style' stays."""
    return description[:1].lower() + description[1:] if description[1:2].islower() else description


def _sample_prompt(template: str, description, attributes, sample_schema, n) -> tuple[tuple[str, str], ...]:
    return _messages(
        _tidy(
            template.format(
                description=description,
                subspace=render_subspace(attributes),
                n=n,
                examples=examples_phrase(n),
                fields=describe_fields(sample_schema),
            )
        )
    )


def pivots_messages(description, attributes, sample_schema, n, template: str | None = None):
    return _sample_prompt(template or PIVOTS, description, attributes, sample_schema, n)


def _criterion_turn(template: str, description: str, attributes, pivots: Sequence[str], used_dimensions: Sequence[str]) -> str:
    used = f" Do not sort them by {' or '.join(used_dimensions)}." if used_dimensions else ""
    return _tidy(
        template.format(
            description=_inline(description),
            subspace=render_subspace(attributes),
            n=len(pivots),
            numbered_pivots="\n".join(f"- {p}" for p in pivots),
            used_dimensions=used,
        )
    )


def criterion_messages(
    description, attributes, pivots: Sequence[dict], used_dimensions: Sequence[str], template: str | None = None, attempt: int = 0
):
    """A few-shot conversation: two shots (``criterion_shots``), each a user
    turn rendered with the same template and the answer the grammar would
    give, then the node's own pivots."""
    template = template or CRITERION
    messages: list[tuple[str, str]] = [("system", SYSTEM)]
    for shot_description, shot_pivots, dimension, labels in criterion_shots(attempt, used_dimensions):
        messages.append(("user", _criterion_turn(template, shot_description, [], shot_pivots, [])))
        messages.append(("assistant", json.dumps({"dimension": dimension, "labels": list(labels)}, separators=(",", ":"))))
    texts = [pivot_text(p) for p in pivots]
    messages.append(("user", _criterion_turn(template, description, attributes, texts, used_dimensions)))
    return tuple(messages)


def _coverage_turn(template: str, description: str, attributes, dimension: str, values: Sequence[str]) -> str:
    return _tidy(
        template.format(
            description=_inline(description),
            subspace=render_subspace(attributes),
            dimension=dimension,
            values=", ".join(values),
            max_new=COVERAGE_MAX_NEW,
        )
    )


def coverage_messages(description, attributes, dimension: str, values: Sequence[str], template: str | None = None, round_: int = 0):
    template = template or COVERAGE
    messages: list[tuple[str, str]] = [("system", SYSTEM)]
    for shot_description, shot_dimension, shot_values, status, new in coverage_shots(round_):
        messages.append(("user", _coverage_turn(template, shot_description, [], shot_dimension, shot_values)))
        messages.append(("assistant", json.dumps({"status": status, "new_values": list(new)}, separators=(",", ":"))))
    messages.append(("user", _coverage_turn(template, description, attributes, dimension, values)))
    return tuple(messages)


def leaf_messages(description, attributes, sample_schema, n, template: str | None = None):
    return _sample_prompt(template or LEAF, description, attributes, sample_schema, n)


def instruction_text(step: str, template: str | None = None) -> str:
    """The normalised words of a step's template without its placeholders:
    what a value copied from our own wording would match (checks.value_problem)."""
    from treesynth.engine.checks import normalise

    source = template or TEMPLATES[step]
    return normalise(" ".join(literal for literal, _, _, _ in Formatter().parse(source)))
