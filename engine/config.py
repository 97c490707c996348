"""The task and tree parameters: one pydantic model, loaded from a TOML task
file or a bare sentence, overridden by CLI flags. Its content part is hashed
and stored with the run; a different content config on an existing store is
refused."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from treesynth.store.keys import content_key

MAX_DEPTH = 8

DEFAULT_SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 20, "maxLength": 400, "description": "one complete sample, written out in full"}
    },
    "required": ["text"],
    "additionalProperties": False,
}

# Export puts these beside a sample's own fields.
RESERVED_FIELDS = ("leaf", "attributes")


class ConfigError(ValueError):
    """A user-caused configuration problem; the CLI prints it as one line."""


class Temperatures(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pivots: float = Field(0.9, ge=0.0, le=2.0, description="Temperature for pivot samples.")
    criterion: float = Field(0.5, ge=0.0, le=2.0, description="Temperature for criterion determination.")
    coverage: float = Field(0.5, ge=0.0, le=2.0, description="Temperature for subspace coverage.")
    leaf: float = Field(0.9, ge=0.0, le=2.0, description="Temperature for leaf synthesis.")


class PromptOverrides(BaseModel):
    """Per-step prompt templates; None keeps the built-in one. The placeholders
    of each step are in treesynth.engine.prompts.PLACEHOLDERS."""

    model_config = ConfigDict(extra="forbid")
    pivots: str | None = Field(None, min_length=1, max_length=8000, description="Template of the pivot samples prompt.")
    criterion: str | None = Field(None, min_length=1, max_length=8000, description="Template of the criterion prompt.")
    coverage: str | None = Field(None, min_length=1, max_length=8000, description="Template of the coverage prompt.")
    leaf: str | None = Field(None, min_length=1, max_length=8000, description="Template of the leaf synthesis prompt.")

    @model_validator(mode="after")
    def _templates_render(self) -> "PromptOverrides":
        from treesynth.engine.prompts import check_template

        for step in ("pivots", "criterion", "coverage", "leaf"):
            template = getattr(self, step)
            if template is not None:
                check_template(step, template)
        return self


class ShuffleChoices(BaseModel):
    """Balance the position of the correct answer: in each leaf sample, move the
    choice that ``label`` names to a seeded position (see engine/spec.py)."""

    model_config = ConfigDict(extra="forbid")
    choices: str = Field(..., min_length=1, description="Array field of the answer choices (minItems = maxItems).")
    label: str = Field(..., min_length=1, description="Enum field naming the correct choice; its i-th value is position i.")


class TaskConfig(BaseModel):
    """Everything that decides the content of a run. Changing any field changes the data."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(..., min_length=1, max_length=2000, description="The data space, in one sentence.")
    sample_schema: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SAMPLE_SCHEMA), description="JSON schema of one sample."
    )
    depth: int = Field(2, ge=0, le=MAX_DEPTH, description="Maximum tree depth; nodes at this depth are leaves.")
    pivots: int = Field(10, ge=2, le=50, description="Pivot samples drawn per node.")
    leaf_samples: int = Field(10, ge=1, le=50, description="Samples a leaf makes per leaf call (a leaf makes infinite_samples ** k calls).")
    samples: int | None = Field(
        None, ge=1, description="Exactly this many records after dedup, spread equally over the leaves and topped up where a leaf falls short."
    )
    samples_per_request: int = Field(
        1, ge=1, le=50, description="Samples one pivot or leaf request asks for; 1 (the default) makes each sample independent."
    )
    criterion_candidates: int = Field(
        3, ge=1, le=20, description="Usable criterion answers gathered per node before the best is chosen."
    )
    near_duplicate: float = Field(
        0.9, gt=0.0, le=1.0, description="Cosine similarity (sentence embedder) at which a sample is a near duplicate of a kept one."
    )
    requests_per_sample: float = Field(
        2.0, ge=1.0, le=10.0, description="Most leaf requests per wanted sample, top-ups for dropped samples included."
    )
    max_values: int = Field(50, ge=2, le=1000, description="More values than this make a dimension infinite.")
    infinite_samples: int = Field(3, ge=1, le=20, description="Leaf calls per infinite dimension on the path (calls = this ** k).")
    criterion_retries: int = Field(8, ge=1, le=40, description="Most criterion attempts per node; none usable makes it a leaf.")
    coverage_rounds: int = Field(8, ge=1, le=50, description="Most coverage rounds per dimension.")
    call_retries: int = Field(3, ge=1, le=20, description="Attempts for a pivot or leaf call whose answer cannot be used.")
    max_samples: int | None = Field(None, ge=1, description="Global sample budget; scales leaf calls when given.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Run seed; every call's seed derives from it.")
    temperature: Temperatures = Field(default_factory=Temperatures)
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass for every call.")
    max_tokens: int = Field(2048, ge=64, le=32768, description="Most tokens one answer may take.")
    prompts: PromptOverrides = Field(default_factory=PromptOverrides, description="Per-step prompt templates.")
    shuffle_choices: ShuffleChoices | None = Field(None, description="Balance the correct choice's position.")

    # Bounds added to the sample schema and other notes for the user; see ``warnings``.
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @field_validator("description")
    @classmethod
    def _description_not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("the description is empty")
        return value

    @field_validator("sample_schema")
    @classmethod
    def _sample_schema_is_bounded(cls, schema: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked and bounded by engine/spec.py; the bounded schema is what
        the run stores and what constrains every pivot and leaf sample."""
        from treesynth.engine.spec import check_sample_schema

        if isinstance(schema.get("properties"), dict):
            for name in RESERVED_FIELDS:
                if name in schema["properties"]:
                    raise ValueError(f"property {name!r} is reserved for export")
        schema, warnings = check_sample_schema(schema)
        if isinstance(info.context, dict):
            info.context.setdefault("warnings", []).extend(f"sample_schema: {w}" for w in warnings)
        return schema

    @model_validator(mode="after")
    def _samples_within_budget(self) -> "TaskConfig":
        if self.samples is not None and self.max_samples is not None and self.samples > self.max_samples:
            raise ValueError(f"samples ({self.samples}) is more than max_samples ({self.max_samples})")
        return self

    @model_validator(mode="after")
    def _shuffle_choices_fit(self, info: ValidationInfo) -> "TaskConfig":
        notes = list(info.context.get("warnings", [])) if isinstance(info.context, dict) else []
        if self.shuffle_choices is not None:
            from treesynth.engine.spec import check_shuffle_choices

            k = check_shuffle_choices(self.sample_schema, self.shuffle_choices.choices, self.shuffle_choices.label)
            if self.leaf_samples % k:
                notes.append(
                    f"shuffle_choices: leaf_samples {self.leaf_samples} is not a multiple of {k} choices; "
                    "the correct choice's position is balanced to within one per leaf"
                )
        self._warnings = notes
        return self

    @property
    def warnings(self) -> list[str]:
        """What the user should hear about this config: bounds added to the sample schema, uneven balance."""
        return list(self._warnings)

    def content_hash(self) -> str:
        return content_key(self.model_dump(mode="json"))


def _format_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {where}: {message}"


def build_config(spec: dict[str, Any], overrides: dict[str, Any], source: str = "task") -> TaskConfig:
    """Merge CLI overrides (None means 'not given') onto a task dict and validate."""
    merged = dict(spec)
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("temperature."):
            merged.setdefault("temperature", {})
            merged["temperature"] = {**merged["temperature"], key.split(".", 1)[1]: value}
        else:
            merged[key] = value
    try:
        return TaskConfig.model_validate(merged, context={"warnings": []})
    except ValidationError as error:
        raise ConfigError(_format_error(error, source)) from None


def load_task_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"task file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read task file {path}: {error}") from None
    return parse_task_text(text, str(path))


def parse_task_text(text: str, source: str) -> dict[str, Any]:
    """A task file's TOML as a task dict; ``sample_schema`` may be a table or a JSON string."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    if "sample_schema" in data and isinstance(data["sample_schema"], str):
        import json

        try:
            data["sample_schema"] = json.loads(data["sample_schema"])
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: sample_schema: not valid JSON: {error}") from None
    return data


def diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "sample_schema":
            keys += diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
