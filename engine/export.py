"""Export and display: JSONL records and the tree as text, read from a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Iterator

from treesynth.store import Store
from treesynth.store.files import write_atomically


def iter_records(store: Store, field_order: list[str]) -> Iterator[str]:
    """One JSON line per sample: its fields in schema order, then the leaf key and the path's attributes."""
    for leaf, data, attributes in store.iter_samples():
        sample = json.loads(data)
        record = {name: sample[name] for name in field_order if name in sample}
        record.update((k, v) for k, v in sample.items() if k not in record)
        record["leaf"] = leaf
        record["attributes"] = json.loads(attributes)
        yield json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(store: Store, field_order: list[str], out: Path | None, stdout: IO[str]) -> int:
    """Write all records; to a file atomically (temp file, then rename), or to stdout."""
    if out is not None:
        return write_atomically(out, iter_records(store, field_order))
    count = 0
    for line in iter_records(store, field_order):
        stdout.write(line)
        count += 1
    return count


def render_tree(store: Store) -> list[str]:
    """The tree as indented lines: each node's attribute, its state, and sample counts of leaves."""
    counts = store.leaf_counts()
    lines = []
    for node in store.nodes_in_tree_order():
        path = node.path
        indent = "  " * node.depth
        if path:
            dimension, value = path[-1]
            label = f"{dimension} = {value}" if not isinstance(value, list) else f"{dimension} ∈ {{{len(value)} values}}"
        else:
            label = "(root)"
        if node.dimension and node.state == "split":
            detail = f"split on {node.dimension!r}" + (" (infinite)" if node.infinite else "")
        elif node.state in ("leaf", "planned", "done"):
            kept, dropped = counts.get(node.key, (0, 0))
            target = node.target
            detail = f"leaf: {kept}" + (f"/{target}" if target is not None else "") + " samples"
            if dropped:
                detail += f", {dropped} dropped"
            if node.reason:
                detail += f" ({node.reason})"
        else:
            detail = node.state
        lines.append(f"{indent}{label}  [{detail}]")
    return lines


def status_lines(store: Store) -> list[str]:
    run = store.run()
    counts = store.counts()
    states: dict[str, Any] = counts["states"]
    leaves = sum(states.get(s, 0) for s in ("leaf", "planned", "done"))
    config = run.config
    from treesynth.engine.baseline import baseline_mark
    from treesynth.engine.plan import eta_text
    from treesynth.store.rates import progress

    baseline = baseline_mark(store)
    kind = "tree run" if baseline is None else f"baseline (temperature sampling from the root prompt, {baseline} samples)"
    return [
        f"store:       {store.path}",
        f"kind:        {kind}",
        f"task:        {config['description']}",
        f"model:       {run.model.get('file', run.model.get('backend'))}",
        f"parameters:  depth {config['depth']}, pivots {config['pivots']}, "
        + (f"samples {config['samples']}" if config.get("samples") else f"leaf samples {config['leaf_samples']}")
        + f", max values {config['max_values']}, infinite samples {config['infinite_samples']}, seed {config['seed']}",
        f"nodes:       {sum(states.values())} ({states.get('split', 0)} split, {leaves} leaves, "
        f"{states.get('done', 0)} leaves done)",
        f"samples:     {counts['samples']}" + (f" of {config['samples']} asked for" if config.get("samples") else ""),
        f"dropped:     {_dropped_line(store)}",
        f"model calls: {counts['calls']} ({counts['tokens']} tokens, {counts['model_seconds']:.1f} s of model time)",
        f"sessions:    {counts['sessions']}",
        f"decoding:    {_decoding(store, run.model)}",
        f"finished:    {'yes' if is_finished(states) else 'no'}",
        f"eta:         {eta_text(config, progress(store), counts['calls'], counts['model_seconds'], is_finished(states))}",
    ]


def _decoding(store: Store, model: dict[str, Any]) -> str:
    """Where the layers run and how many sequences the last session decoded at once."""
    sessions = store.sessions()
    parallel = sessions[-1]["settings"].get("parallel") if sessions else None
    at_once = f"{parallel} sequence{'s' if parallel != 1 else ''} at once" if parallel else "one request at a time"
    return f"{at_once} (last session), {model.get('offload', 'cpu') if model.get('backend') == 'llama.cpp' else model.get('backend')}"


def _dropped_line(store: Store) -> str:
    reasons = store.dropped_reasons()
    if not reasons:
        return "none"
    total = sum(reasons.values())
    return f"{total} (" + ", ".join(f"{why}: {n}" for why, n in reasons.items()) + ")"


PENDING_STATES = ("open", "pivoted", "criterion", "leaf", "planned")


def is_finished(states: dict[str, int]) -> bool:
    return sum(states.values()) > 0 and not any(states.get(s) for s in PENDING_STATES)
