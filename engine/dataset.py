"""A Hugging Face–ready dataset folder from a store: Parquet per split, JSONL on
request, and a README.md dataset card, so that ``datasets.load_dataset(DIR)``
loads it without arguments.

Layout::

    DIR/README.md                            card: YAML front matter (configs, size, license) + how it was made
    DIR/data/<split>-00000-of-00001.parquet  the records of one split, in tree order
    DIR/data/<split>.jsonl                   the same records as JSONL (``jsonl=True``)

Columns: the sample's fields in the schema's order (typed from the sample
schema: string, int64, float64, bool; arrays and objects as Arrow lists and
structs, or JSON text where Arrow cannot type them), ``leaf`` (the leaf's key)
and ``attributes``: a struct with one string field per dimension of the tree
(in the order the tree first uses them), null where a record's path does not
have that dimension. A tree whose root never split has no ``attributes``.

Splits (``train=0.9,test=0.1``): a record goes to the split whose cumulative
fraction first exceeds u, where u = xxh3_64("split:<run seed>:<sample
hash>") / 2**64. A record's split depends only on the run's seed and its own
content, so reruns put every record in the same split, whatever else the run
made. Fractions are exact targets only on average.

The folder is built beside DIR and renamed into place; an existing DIR is
replaced only when it is empty or an earlier export (its card says so).
Same store, same arguments, same pyarrow: the same bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import xxhash

from treesynth.store import Node, Store

MARK = "<!-- written by treesynth export; rewritten by the next export to this folder -->"
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))  # fmt: skip


class DatasetError(ValueError):
    """A user-caused problem (bad --split, unusable folder); one line."""


@dataclass(frozen=True)
class Written:
    folder: Path
    rows: dict[str, int]  # split -> records


def parse_splits(text: str | None) -> list[tuple[str, float]]:
    """``train=0.9,test=0.1`` -> [("train", 0.9), ("test", 0.1)]; None -> all in train."""
    if text is None:
        return [("train", 1.0)]
    splits: list[tuple[str, float]] = []
    for part in text.split(","):
        name, eq, number = part.strip().partition("=")
        name = name.strip()
        if not eq or not _SPLIT_NAME.match(name):
            raise DatasetError(f"--split {text!r}: write NAME=FRACTION pairs such as train=0.9,test=0.1 (names: lowercase letters, digits, _)")
        try:
            fraction = float(number)
        except ValueError:
            raise DatasetError(f"--split {text!r}: {number.strip()!r} is not a number") from None
        if not 0 < fraction <= 1:
            raise DatasetError(f"--split {text!r}: the fraction of {name} must be above 0 and at most 1")
        if name in (n for n, _ in splits):
            raise DatasetError(f"--split {text!r}: split {name} is named twice")
        splits.append((name, fraction))
    total = sum(f for _, f in splits)
    if abs(total - 1.0) > 1e-9:
        raise DatasetError(f"--split {text!r}: the fractions add up to {total:g}, not 1")
    return splits


def split_of(seed: int, sample_hash: str, splits: Sequence[tuple[str, float]]) -> str:
    u = xxhash.xxh3_64_intdigest(f"split:{seed}:{sample_hash}".encode()) / 2**64
    edge = 0.0
    for name, fraction in splits:
        edge += fraction
        if u < edge:
            return name
    return splits[-1][0]


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>100M"


# -- records and columns --------------------------------------------------------------


def _records(store: Store, nodes: list[Node], fields: list[str], seed: int, splits) -> tuple[dict[str, list[dict]], list[str]]:
    """Records by split in tree order, and the tree's dimensions in first-use order."""
    by_split: dict[str, list[dict]] = {name: [] for name, _ in splits}
    dimensions: dict[str, None] = {}
    for node in nodes:
        for dimension, _ in node.path:
            dimensions.setdefault(dimension, None)
    for leaf, data, attributes, sample_hash in store.iter_sample_rows():
        sample = json.loads(data)
        record = {name: sample.get(name) for name in fields}
        record["leaf"] = leaf
        record["attributes"] = json.loads(attributes)
        by_split[split_of(seed, sample_hash, splits)].append(record)
    return by_split, list(dimensions)


def _arrow_type(pa, prop: dict[str, Any]):
    kind = prop.get("type")
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}.get(kind)


def _column(pa, values: list, prop: dict[str, Any]):
    """One Arrow column: typed by the schema, else inferred, else JSON text."""
    wanted = _arrow_type(pa, prop)
    if wanted is not None:
        try:
            return pa.array(values, type=wanted)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    else:
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], type=pa.string())


def _attribute_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def arrow_table(pa, records: list[dict], fields: list[str], properties: dict, dimensions: list[str]):
    columns, names = [], []
    for name in fields:
        columns.append(_column(pa, [r[name] for r in records], properties.get(name, {})))
        names.append(name)
    columns.append(pa.array([r["leaf"] for r in records], type=pa.string()))
    names.append("leaf")
    if dimensions:
        struct = pa.struct([(d, pa.string()) for d in dimensions])
        values = [{d: _attribute_text(r["attributes"].get(d)) for d in dimensions} for r in records]
        columns.append(pa.array(values, type=struct))
        names.append("attributes")
    return pa.Table.from_arrays(columns, names=names)


# -- the folder -------------------------------------------------------------------


def check_folder(folder: Path) -> None:
    """Refuse a folder export must not replace: a file, or a non-empty folder that is not an earlier export."""
    if not folder.parent.is_dir():
        raise DatasetError(f"cannot write {folder}: directory {folder.parent} does not exist")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DatasetError(f"cannot write {folder}: it exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        card = folder / "README.md"
        if not (card.is_file() and MARK in card.read_text(encoding="utf-8", errors="replace")):
            raise DatasetError(f"{folder} is not empty and not an earlier treesynth export; choose a new folder")


def write_dataset(
    store: Store, folder: Path, *, splits: Sequence[tuple[str, float]], jsonl: bool, reproduce: str | None = None
) -> Written:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("export --to writes Parquet through pyarrow, which is not installed: pip install 'treesynth[parquet]'") from None
    check_folder(folder)
    run = store.run()
    config = run.config
    properties = config["sample_schema"]["properties"]
    fields = list(properties)
    nodes = store.nodes()  # read once: the columns' dimensions and the card's statistics
    by_split, dimensions = _records(store, nodes, fields, run.seed, splits)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "data").mkdir(parents=True)
        for name, records in by_split.items():
            table = arrow_table(pa, records, fields, properties, dimensions)
            pq.write_table(table, tmp / "data" / f"{name}-00000-of-00001.parquet", compression="zstd")
            if jsonl:
                with open(tmp / "data" / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    for record in records:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        rows = {name: len(records) for name, records in by_split.items()}
        card = dataset_card(store, nodes, splits, rows, fields, dimensions, reproduce, pa.__version__)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(folder, rows)


def _replace(tmp: Path, folder: Path) -> None:
    """Move the new folder into place; an earlier export is moved aside first and then removed."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if old.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- the card ---------------------------------------------------------------------


def _yaml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def tree_statistics(store: Store, nodes: list[Node]) -> dict[str, Any]:
    leaves = [n for n in nodes if n.state in ("leaf", "planned", "done")]
    counts = store.leaf_counts()
    kept = [counts.get(n.key, (0, 0))[0] for n in leaves]
    max_depth = store.run().config["depth"]
    inner = [n for n in nodes if n.depth < max_depth]
    return {
        "nodes": len(nodes),
        "split": sum(n.state == "split" for n in nodes),
        "inner": len(inner),
        "leaves": len(leaves),
        "early_leaves": sum(1 for n in leaves if n.reason),
        "deepest": max((n.depth for n in nodes), default=0),
        "kept_min": min(kept, default=0),
        "kept_max": max(kept, default=0),
        "splits": [(n.depth, [_path_value(p[1]) for p in n.path], n.dimension, n.value_list) for n in nodes if n.state == "split"],
    }


def _path_value(value: Any) -> str:
    return value if isinstance(value, str) else f"{{{len(value)} values}}"  # an infinite dimension's value list


def dataset_card(store, nodes, splits, rows: dict[str, int], fields, dimensions, reproduce, pyarrow_version: str) -> str:
    from treesynth.engine.contract import REVISION
    from treesynth.engine.diversity import stored_diversity

    run = store.run()
    config = run.config
    total = sum(rows.values())
    stats = tree_statistics(store, nodes)
    reasons = store.dropped_reasons()
    diversity = stored_diversity(store)
    front = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *[f"  - split: {name}\n    path: data/{name}-*.parquet" for name, _ in splits],
        "license: unknown  # set the license that applies to your use of this data",
        "task_categories:",
        "- text-generation",
        "size_categories:",
        f"- {size_category(total)}",
        "tags:",
        "- synthetic",
        "- treesynth",
        f"pretty_name: {_yaml_string(config['description'][:80])}",
        "---",
    ]
    model = run.model
    lines = [
        MARK,
        "",
        f"# {config['description']}",
        "",
        f"{total} synthetic records made offline by treesynth {run.treesynth_version} with the "
        "[TreeSynth](https://arxiv.org/abs/2503.17195) method: the model itself split the data space into a tree "
        "of attributes, and every record was written for one leaf's path.",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/this/folder")  # splits: {", ".join(rows)}',
        "```",
        "",
        "## Splits",
        "",
        "| split | fraction | records |",
        "|---|---|---|",
        *[f"| {name} | {fraction:g} | {rows[name]} |" for name, fraction in splits],
        "",
        "A record's split is a function of the run's seed and the record's content hash alone, so reruns keep every record in its split.",
        "",
        "## Columns",
        "",
        *[f"- `{name}`: {config['sample_schema']['properties'][name].get('type', 'JSON')} (sample field)" for name in fields],
        "- `leaf`: the key of the leaf the record was written for",
        (
            "- `attributes`: the leaf's path, one string per dimension, null where the path lacks it: "
            + ", ".join(f"`{d}`" for d in dimensions)
            if dimensions
            else "- no `attributes`: the root was never split, so every record comes from the whole data space"
        ),
        "",
        "## The tree",
        "",
        f"- nodes: {stats['nodes']}; split: {stats['split']} of the {stats['inner']} below max depth {config['depth']}; "
        f"deepest node at depth {stats['deepest']}; leaves: {stats['leaves']}, of which {stats['early_leaves']} "
        f"became leaves before max depth; records per leaf: {stats['kept_min']} to {stats['kept_max']}.",
        *[
            f"- {'/'.join(path) or '(root)'}: split on `{dimension}` into "
            + ", ".join(f"`{v}`" for v in values[:12])
            + (f" … ({len(values)} values)" if len(values) > 12 else "")
            for _, path, dimension, values in stats["splits"][:40]
        ],
        f"- samples not kept: {sum(reasons.values())}"
        + (" (" + ", ".join(f"{why}: {n}" for why, n in reasons.items()) + ")" if reasons else ""),
        "",
        "## Diversity",
        "",
    ]
    if diversity.cosine is not None and diversity.with_vector == diversity.samples:
        over = (
            f"all {diversity.embedded} records"
            if diversity.embedded == diversity.samples
            else f"a seeded subset of {diversity.embedded} of the {diversity.samples} records"
        )
        lines.append(
            f"Over {over} (all-MiniLM-L6-v2 embeddings stored with each record): mean pairwise "
            f"cosine {diversity.cosine:.3f} (lower is more diverse), near duplicates "
            f"(cosine ≥ 0.95 to an earlier record) {diversity.near_duplicates:.1%}."
        )
    else:
        lines.append("Not computed: the store holds no embedding for some records (run `treesynth diversity` on the export).")
    lines += [
        "",
        "## How it was made",
        "",
        f"- model: `{model.get('file', model.get('backend'))}`"
        + (f", `{model['file_hash']}`" if model.get("file_hash") else "")
        + "".join(f", {k} `{model[k]}`" for k in ("backend", "quantisation", "sampler") if model.get(k)),
        f"- seed: {run.seed}",
        f"- method: revision {REVISION}, hash `{run.method_hash}` (prompts, shots, checks and dedup rules; "
        "a store is only continued under the method that wrote it)",
        f"- written with pyarrow {pyarrow_version}",
        "",
        "The run's task config:",
        "",
        "```json",
        json.dumps(config, ensure_ascii=False, indent=2),
        "```",
        "",
        "## Reproduce",
        "",
        "The same treesynth version, model file and command give the same records, byte for byte:",
        "",
        "```",
        reproduce or "treesynth run ... (the store holds no session that ran it)",
        "```",
        "",
        "## License",
        "",
        "Not set: the license field above is for the user to fill in. Consider the model's license and the task.",
        "",
    ]
    return "\n".join(front) + "\n" + "\n".join(lines)
