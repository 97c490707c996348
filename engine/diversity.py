"""Diversity of a dataset: the paper's figure and measures that need no model.

Definitions (what a person recomputing the numbers should do):

- Text of a sample: the fields named with ``--field``, in that order, or by
  default every string field of the record except ``leaf`` and
  ``attributes``, in the record's order; joined with a newline. A non-string
  field named with ``--field`` counts as its JSON.
- Words: ``re.findall(r"\\w+", text.lower())``.
- Mean pairwise cosine similarity: the embeddings are L2-normalised; the mean
  of e_i . e_j over all pairs i < j. Computed exactly in O(n d) as
  (|sum e|^2 - sum |e_i|^2) / (n (n - 1)). Lower is more diverse. Beyond
  ``max_embed`` samples, a seeded random subset of ``max_embed`` samples is
  embedded and all pairs among it are used; the output says so.
- distinct-n: distinct word n-grams / all word n-grams, n-grams taken inside
  each sample (Li et al., 2016).
- Exact duplicates: the share of samples whose text equals an earlier
  sample's text.
- Near duplicates: the share of samples whose word-3-gram set (the word set
  for texts of fewer than 3 words) has Jaccard similarity >= ``near`` with an
  earlier sample's (exact duplicates included). Computed exactly for every
  pair with prefix filtering, no sampling.
- Near duplicates by embedding: the share of samples whose embedding has
  cosine similarity >= ``cosine_near`` (0.95) with the embedding of an
  EARLIER sample of the same file (so a pair of near-copies counts once: the
  share a keep-the-first dedup would drop; exact duplicates included). Over
  the embedded samples (the seeded subset beyond ``max_embed``).
- Reference similarity (``--reference FILE``): FILE is JSONL of real (or
  hand-written) data of the domain, its text taken by the same rules as the
  measured files'. For each embedded sample, the highest cosine similarity
  to any reference record (its nearest reference record); the mean over
  samples. Higher = looks more like the real thing; a file measured against
  itself scores 1. Beyond ``max_embed`` reference records, a seeded random
  subset of ``max_embed`` is embedded (same seed). Noise and off-task text
  score low here however diverse they look by mean cosine.

The embedder is independent of the generator by default (MiniLM, see
``treesynth.models.embed``); its fingerprint is printed with the table."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from treesynth.store.keys import canonical_json

EXCLUDED_FIELDS = ("leaf", "attributes")
SHINGLE = 3
DEFAULT_NEAR = 0.7
DEFAULT_MAX_EMBED = 2000
DEFAULT_COSINE_NEAR = 0.95
_WORDS = re.compile(r"\w+")


class InputError(ValueError):
    """A user-caused problem with an input file; the CLI prints it as one line."""


# -- reading samples ---------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    raw: str  # the line as it was, without its newline
    data: dict[str, Any]
    text: str


def sample_text(data: dict[str, Any], fields: Sequence[str] | None) -> str | None:
    """The text of one record, or None when a named field is absent (or, by
    default, when the record has no string field)."""
    if fields:
        parts = []
        for name in fields:
            if name not in data:
                return None
            value = data[name]
            parts.append(value if isinstance(value, str) else canonical_json(value))
        return "\n".join(parts)
    parts = [v for k, v in data.items() if k not in EXCLUDED_FIELDS and isinstance(v, str)]
    return "\n".join(parts) if parts else None


def read_jsonl(path: Path, fields: Sequence[str] | None, skip_bad: bool) -> tuple[list[Record], int]:
    """The usable records of a JSONL file and how many bad lines were skipped.
    Blank lines are ignored. Without ``skip_bad`` the first bad line is an
    InputError naming it."""
    try:
        content = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a JSONL file") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    records: list[Record] = []
    bad = 0
    for number, raw_bytes in enumerate(content.splitlines(), 1):
        if not raw_bytes.strip():
            continue
        record, problem = _parse_line(raw_bytes, number, fields)
        if problem is None:
            records.append(record)
            continue
        if not skip_bad:
            raise InputError(f"{path} line {number}: {problem} (--skip-bad skips such lines)")
        bad += 1
    if not records:
        if bad:
            raise InputError(f"{path}: no usable line ({bad} bad lines skipped)")
        raise InputError(f"{path} is empty")
    return records, bad


def _parse_line(raw_bytes: bytes, number: int, fields: Sequence[str] | None) -> tuple[Record | None, str | None]:
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    raw = raw.rstrip("\r")
    try:
        data = json.loads(raw)
    except ValueError as error:
        return None, f"not JSON ({error.args[0].split(':')[0]})"
    if not isinstance(data, dict):
        return None, f"not a JSON object (a {type(data).__name__})"
    text = sample_text(data, fields)
    if text is None:
        if fields:
            missing = [name for name in fields if name not in data]
            return None, f"no field {missing[0]!r}"
        return None, "no string field to use as text (name one with --field)"
    return Record(number, raw, data, text), None


def store_texts(store, fields: Sequence[str] | None) -> tuple[list[str], int]:
    """The texts of a store's samples in export order, and how many lacked a named field."""
    texts, missing = [], 0
    for _, data, _ in store.iter_samples():
        text = sample_text(json.loads(data), fields)
        if text is None:
            missing += 1
        else:
            texts.append(text)
    return texts, missing


# -- measures ---------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> tuple[int, int]:
    """(distinct n-grams, all n-grams), n-grams taken inside each sample."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen), total


def mean_pairwise_cosine(embeddings: np.ndarray) -> float | None:
    """Mean cosine similarity over all pairs i < j of L2-normalised rows."""
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    if n < 2:
        return None
    total = e.sum(axis=0)
    squares = float(np.einsum("ij,ij->", e, e))
    return (float(total @ total) - squares) / (n * (n - 1))


def cosine_near_duplicate_flags(embeddings: np.ndarray, threshold: float = DEFAULT_COSINE_NEAR) -> list[bool]:
    """For each row: cosine >= ``threshold`` with an earlier row (unit rows)."""
    e = np.asarray(embeddings, dtype=np.float64)
    flags = []
    for i in range(e.shape[0]):
        flags.append(bool(i) and bool((e[:i] @ e[i] >= threshold).any()))
    return flags


def reference_similarity(embeddings: np.ndarray, reference: np.ndarray) -> float | None:
    """Mean over rows of the cosine to the nearest reference row (unit rows)."""
    e, r = np.asarray(embeddings, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if e.shape[0] == 0 or r.shape[0] == 0:
        return None
    nearest = np.concatenate([(e[i : i + 512] @ r.T).max(axis=1) for i in range(0, e.shape[0], 512)])
    return float(nearest.mean())


def shingles(tokens: Sequence[str]) -> frozenset[tuple[str, ...]]:
    size = min(SHINGLE, len(tokens))
    if size == 0:
        return frozenset()
    return frozenset(tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1))


def duplicate_flags(texts: Sequence[str], near: float) -> tuple[list[bool], list[bool]]:
    """For each text: equal to an earlier text; within Jaccard ``near`` of an
    earlier text's shingle set. Exact for all pairs: prefix filtering (a pair
    with Jaccard >= t shares a shingle among the first |x| - ceil(t|x|) + 1
    shingles of each set, in one global order) prunes the pairs to check."""
    t = Fraction(str(near))
    exact = [False] * len(texts)
    near_flags = [False] * len(texts)
    first: dict[str, int] = {}
    sets: list[frozenset] = []
    for i, text in enumerate(texts):
        if text in first:
            exact[i] = near_flags[i] = True
        else:
            first[text] = i
        sets.append(shingles(words(text)))
    frequency = Counter(s for i, text in enumerate(texts) if first[text] == i for s in sets[i])
    rank = {s: r for r, s in enumerate(sorted(frequency, key=lambda s: (frequency[s], s)))}
    index: dict[int, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        if first[text] != i or not sets[i]:
            continue
        x = sets[i]
        ordered = sorted(rank[s] for s in x)
        prefix = ordered[: len(x) - math.ceil(t * len(x)) + 1]
        checked: set[int] = set()
        for token in prefix:
            for j in index[token]:
                if j in checked:
                    continue
                checked.add(j)
                y = sets[j]
                if _jaccard_at_least(x, y, t):
                    near_flags[i] = True
                    break
            if near_flags[i]:
                break
        for token in prefix:
            index[token].append(i)
    return exact, near_flags


def _jaccard_at_least(x: frozenset, y: frozenset, t: Fraction) -> bool:
    small, large = sorted((len(x), len(y)))
    if small < t * large:  # |x & y| <= small and |x | y| >= large
        return False
    inter = len(x & y)
    return inter >= t * (len(x) + len(y) - inter)


@dataclass
class Diversity:
    name: str
    samples: int
    embedded: int  # samples embedded (all, or a seeded subset)
    pairs: int  # pairs the cosine figure is the mean of
    cosine: float | None  # mean pairwise cosine similarity; None: not measured
    distinct_1: float | None
    distinct_2: float | None
    unique_1: int
    unique_2: int
    exact_duplicates: float
    near_duplicates: float
    near: float
    subset_seed: int | None  # set when a subset was embedded
    cosine_near_duplicates: float | None = None  # share with cosine >= cosine_near to an earlier sample
    cosine_near: float = DEFAULT_COSINE_NEAR
    reference: str | None = None  # the --reference file
    reference_similarity: float | None = None  # mean cosine to the nearest reference record

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def embedding_subset(n: int, max_embed: int, seed: int) -> list[int] | None:
    """Indices of the samples to embed beyond ``max_embed`` (sorted), or None for all."""
    if n <= max_embed:
        return None
    return sorted(random.Random(seed).sample(range(n), max_embed))


def measure(
    name: str,
    texts: Sequence[str],
    embedder=None,
    *,
    max_embed: int = DEFAULT_MAX_EMBED,
    seed: int = 0,
    near: float = DEFAULT_NEAR,
    cosine_near: float = DEFAULT_COSINE_NEAR,
    reference: Reference | None = None,
) -> Diversity:
    """Every measure of one file's texts; ``embedder`` None skips the
    embedding measures, ``reference`` None the reference similarity."""
    tokens = [words(t) for t in texts]
    unique_1, total_1 = distinct_n(tokens, 1)
    unique_2, total_2 = distinct_n(tokens, 2)
    exact, near_flags = duplicate_flags(texts, near)
    n = len(texts)
    cosine, embedded, pairs, subset_seed, cosine_dups, ref_sim = None, 0, 0, None, None, None
    if embedder is not None:
        subset = embedding_subset(n, max_embed, seed)
        chosen = texts if subset is None else [texts[i] for i in subset]
        embedded = len(chosen)
        pairs = embedded * (embedded - 1) // 2
        vectors = embedder.embed(chosen)
        cosine = mean_pairwise_cosine(vectors) if embedded >= 2 else None
        cosine_dups = sum(cosine_near_duplicate_flags(vectors, cosine_near)) / embedded if embedded else None
        subset_seed = None if subset is None else seed
        if reference is not None:
            ref_sim = reference_similarity(vectors, reference.embeddings)
    return Diversity(
        name=name,
        samples=n,
        embedded=embedded,
        pairs=pairs,
        cosine=cosine,
        distinct_1=unique_1 / total_1 if total_1 else None,
        distinct_2=unique_2 / total_2 if total_2 else None,
        unique_1=unique_1,
        unique_2=unique_2,
        exact_duplicates=sum(exact) / n if n else 0.0,
        near_duplicates=sum(near_flags) / n if n else 0.0,
        near=near,
        subset_seed=subset_seed,
        cosine_near_duplicates=cosine_dups,
        cosine_near=cosine_near,
        reference=None if reference is None else reference.name,
        reference_similarity=ref_sim,
    )


@dataclass
class Reference:
    """Real (or hand-written) data of the domain, embedded once."""

    name: str
    records: int  # records with text
    embedded: int  # records embedded (all, or a seeded subset)
    embeddings: np.ndarray


def read_reference(path: Path, fields: Sequence[str] | None, skip_bad: bool) -> tuple[list[str], int]:
    """The texts of a reference file and how many bad lines were skipped;
    every problem is one InputError line that says it is about the reference."""
    try:
        records, bad = read_jsonl(Path(path), fields, skip_bad)
    except InputError as error:
        raise InputError(f"reference: {error}") from None
    texts = [r.text for r in records if r.text.strip()]
    if not texts:
        raise InputError(f"reference: {path} has no record with text to compare against")
    return texts, bad


def embed_reference(name: str, texts: Sequence[str], embedder, *, max_embed: int = DEFAULT_MAX_EMBED, seed: int = 0) -> Reference:
    subset = embedding_subset(len(texts), max_embed, seed)
    chosen = list(texts) if subset is None else [texts[i] for i in subset]
    return Reference(name, len(texts), len(chosen), embedder.embed(chosen))


# -- display -----------------------------------------------------------------------


def table_lines(results: Sequence[Diversity]) -> list[str]:
    """The files side by side, one column each, then a note per sampled file."""
    near = results[0].near if results else DEFAULT_NEAR
    cosine_near = results[0].cosine_near if results else DEFAULT_COSINE_NEAR

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    rows = [
        ("", [r.name for r in results]),
        ("samples", [str(r.samples) for r in results]),
        ("mean cosine similarity (lower = more diverse)", [fmt(r.cosine) for r in results]),
        ("pairs averaged", [str(r.pairs) + (" *" if r.subset_seed is not None else "") if r.cosine is not None else "-" for r in results]),
        ("distinct-1", [fmt(r.distinct_1) for r in results]),
        ("distinct-2", [fmt(r.distinct_2) for r in results]),
        ("distinct words", [str(r.unique_1) for r in results]),
        ("distinct word pairs", [str(r.unique_2) for r in results]),
        ("exact duplicates", [f"{100 * r.exact_duplicates:.1f} %" for r in results]),
        (f"near duplicates (3-gram Jaccard >= {near:g})", [f"{100 * r.near_duplicates:.1f} %" for r in results]),
        (f"near duplicates (cosine >= {cosine_near:g})", [pct(r.cosine_near_duplicates) for r in results]),
    ]
    if any(r.reference is not None for r in results):
        rows.append(("reference similarity (higher = closer to the reference)", [fmt(r.reference_similarity) for r in results]))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(results))]
    lines = [
        "  ".join([label.ljust(label_width)] + [cell.rjust(w) for cell, w in zip(cells, widths)]).rstrip()
        for label, cells in rows
    ]
    for r in results:
        if r.subset_seed is not None:
            lines.append(
                f"* {r.name}: cosine similarity over a seeded random {r.embedded} of {r.samples} samples "
                f"(all {r.pairs} pairs among them; seed {r.subset_seed})"
            )
    return lines


# -- from a store's own vectors ------------------------------------------------------


@dataclass(frozen=True)
class StoredDiversity:
    samples: int  # kept samples in the store
    with_vector: int  # of them, with a stored embedding
    embedded: int  # vectors the figures are over (all, or the seeded subset)
    cosine: float | None  # mean pairwise cosine similarity; None: not computed
    near_duplicates: float | None  # share with cosine >= DEFAULT_COSINE_NEAR to an earlier sample


def stored_diversity(store) -> StoredDiversity:
    """Mean pairwise cosine and near-duplicate share over the embeddings the
    run stored with its kept samples (``samples.vector``), in export order,
    by this module's definitions (the seeded subset beyond ``max_embed``)."""
    from treesynth.store import reports

    samples, with_vector = reports.vector_counts(store)
    if with_vector < 2:
        return StoredDiversity(samples, with_vector, 0, None, None)
    subset = embedding_subset(with_vector, DEFAULT_MAX_EMBED, 0)
    wanted = None if subset is None else set(subset)
    chosen = [v for i, v in enumerate(reports.sample_vectors(store)) if wanted is None or i in wanted]
    if len({len(v) for v in chosen}) != 1:
        return StoredDiversity(samples, with_vector, 0, None, None)
    matrix = np.stack([np.frombuffer(v, dtype=np.float32) for v in chosen]).astype(np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = matrix / np.where(norms == 0, 1.0, norms)  # stored rows are unit already; this only guards
    flags = cosine_near_duplicate_flags(matrix, DEFAULT_COSINE_NEAR)
    return StoredDiversity(samples, with_vector, len(chosen), mean_pairwise_cosine(matrix), sum(flags) / len(flags))
