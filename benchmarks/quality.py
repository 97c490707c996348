"""The quality benchmark (a benchmark, not a test): tree vs baseline on the
embedded model for the task sentences of benchmarks/tasks.toml and the four
presets; prints a table and writes quality.json at the repo root.

For each task: `treesynth run` (fixed flags and seed) into NAME.db, then
`treesynth baseline --like NAME.db` into NAME-base.db, both as subprocesses,
``--jobs`` tasks at a time. Then, from the stores (read-only), with the
independent embedder (MiniLM, as `treesynth diversity` uses by default):

- cosine: mean pairwise cosine similarity of the records (lower = more diverse).
- dups: near duplicates, the share of records with cosine >= 0.95 to an
  earlier record (treesynth.engine.diversity's definition).
- format: share of records whose text mentions the prompt's format: json,
  array(s), field(s), object(s), ``{word}`` placeholders or ``"key":``
  (case-insensitive), each pattern dropped when the task sentence matches it.
- ref: mean cosine of each record to its nearest record of
  benchmarks/reference/NAME.jsonl (hand-written stand-ins), where one exists.
- split: share of the tree's nodes below max depth that split; depth: the
  deepest node; words: share of (dimension, value) pairs of split nodes whose
  dimension and value are both short word phrases (PHRASE below, <= 40 chars).
- samples, secs: records made and wall seconds of each subprocess.

Usage: .venv/bin/python benchmarks/quality.py [--tasks a,b] [--samples N]
[--depth D] [--jobs J] [--model GGUF] [--keep DIR] [--output FILE]

--model runs both sides on another local GGUF, e.g. the bench's Gemma 3 270M:
--model "$(.venv/bin/python -c 'from treesynth.models.embedded import gemma_path; print(gemma_path())')"."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
PHRASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9'\-]*( [A-Za-z0-9][A-Za-z0-9'\-]*){0,3}$")
FORMAT_PATTERNS = {
    "json": r"\bjson\b",
    "array": r"\barrays?\b",
    "field": r"\bfields?\b",
    "object": r"\bobjects?\b",
    # {word} placeholders; not LaTeX groups such as \frac{a}{b} or x^{n}.
    "placeholder": r"(?<![\\\w^_$])\{[A-Za-z_]\w*\}",
    "key": r'"\w+"\s*:',
}
FIXED = ["--depth", "{depth}", "--pivots", "4", "--max-values", "4", "--seed", "1"]


def treesynth() -> list[str]:
    script = Path(sys.executable).parent / "treesynth"
    return [str(script)] if script.exists() else [sys.executable, "-m", "treesynth"]


def load_tasks(only: list[str] | None) -> list[dict]:
    spec = tomllib.loads((HERE / "tasks.toml").read_text(encoding="utf-8"))
    from treesynth.engine.presets import load_preset

    tasks = [{"name": t["name"], "description": t["description"], "preset": None} for t in spec.get("task", [])]
    tasks += [{"name": p["name"], "description": load_preset(p["name"])["description"], "preset": p["name"]} for p in spec.get("preset", [])]
    if only:
        unknown = sorted(set(only) - {t["name"] for t in tasks})
        if unknown:
            sys.exit(f"error: unknown task(s) {', '.join(unknown)}; the tasks are: {', '.join(t['name'] for t in tasks)}")
        tasks = [t for t in tasks if t["name"] in only]
    for t in tasks:
        reference = HERE / "reference" / f"{t['name']}.jsonl"
        t["reference"] = reference if reference.exists() else None
    return tasks


def sample_flags(samples: int) -> list[str]:
    """--samples N where the engine has it, else the older budget flags."""
    env = {**os.environ, "COLUMNS": "200"}
    help_text = subprocess.run([*treesynth(), "run", "--help"], capture_output=True, text=True, env=env).stdout
    if re.search(r"(?<![\w-])--samples\b", help_text):
        return ["--samples", str(samples)]
    return ["--leaf-samples", "3", "--infinite-samples", "1", "--max-samples", str(samples)]


def _remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _timed(command: list[str], log) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
    return time.perf_counter() - start, done.returncode, last[0]


def run_task(task: dict, folder: Path, flags: list[str], model: list[str]) -> dict:
    """The tree run, then its baseline (both with MODEL's flags); wall seconds and exit codes."""
    tree, base = folder / f"{task['name']}.db", folder / f"{task['name']}-base.db"
    _remove_store(tree)
    _remove_store(base)
    what = ["--preset", task["preset"]] if task["preset"] else [task["description"]]
    common = ["--no-progress", "--threads", "1", *model]
    result = {"tree_store": tree, "base_store": base}
    with open(folder / f"{task['name']}.log", "w", encoding="utf-8") as log:
        print(f"  {task['name']}: tree run started", file=sys.stderr, flush=True)
        result["tree_seconds"], code, last = _timed([*treesynth(), "run", *what, "--store", str(tree), *common, *flags], log)
        result["tree_error"] = None if code == 0 else f"exit {code}: {last}"
        print(f"  {task['name']}: tree run {'done' if code == 0 else 'FAILED'} ({result['tree_seconds']:.0f} s)", file=sys.stderr, flush=True)
        result["base_seconds"], code, last = _timed([*treesynth(), "baseline", "--like", str(tree), "--store", str(base), *common], log)
        result["base_error"] = None if code == 0 else f"exit {code}: {last}"
        print(f"  {task['name']}: baseline {'done' if code == 0 else 'FAILED'} ({result['base_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return result


def format_share(texts: list[str], description: str) -> float | None:
    patterns = [re.compile(p, re.IGNORECASE) for p in FORMAT_PATTERNS.values() if not re.search(p, description, re.IGNORECASE)]
    return sum(any(p.search(t) for p in patterns) for t in texts) / len(texts) if texts else None


def measure_store(path: Path, task: dict, embedder, reference) -> dict:
    from treesynth.engine import diversity as div
    from treesynth.store import Store

    if not path.exists():
        return {"samples": 0}
    store = Store.open_existing(path, readonly=True)
    try:
        texts, _ = div.store_texts(store, None)
        nodes = store.nodes()
        max_depth = store.run().config.get("depth", 0)
    finally:
        store.close()
    row: dict = {"samples": len(texts), "format": format_share(texts, task["description"])}
    if texts:
        vectors = embedder.embed(texts)
        row["cosine"] = div.mean_pairwise_cosine(vectors)
        row["near_duplicates"] = sum(div.cosine_near_duplicate_flags(vectors)) / len(texts)
        row["reference_similarity"] = div.reference_similarity(vectors, reference.embeddings) if reference else None
    if max_depth > 0:  # a tree, not a baseline
        inner = [n for n in nodes if n.depth < max_depth]
        pairs = [(n.dimension, v) for n in nodes if n.state == "split" for v in n.value_list or []]
        row["split_share"] = sum(n.state == "split" for n in inner) / len(inner) if inner else None
        row["depth_reached"] = max((n.depth for n in nodes), default=0)
        row["word_pairs"] = sum(_phrase(d) and _phrase(v) for d, v in pairs) / len(pairs) if pairs else None
        row["splits"] = [{"path": n.path, "dimension": n.dimension, "values": n.value_list} for n in nodes if n.state == "split"]
        row["not_split"] = [{"path": n.path, "reason": n.reason} for n in inner if n.state != "split"]
    return row


def _phrase(text) -> bool:
    return isinstance(text, str) and len(text) <= 40 and PHRASE.match(text) is not None


def _revision() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# -- the table -------------------------------------------------------------------------

COLUMNS = [  # (header, key, format, both sides)
    ("cosine", "cosine", "{:.3f}", True),
    ("dups", "near_duplicates", "{:.0%}", True),
    ("format", "format", "{:.0%}", True),
    ("ref", "reference_similarity", "{:.3f}", True),
    ("split", "split_share", "{:.0%}", False),
    ("depth", "depth_reached", "{}", False),
    ("words", "word_pairs", "{:.0%}", False),
    ("samples", "samples", "{}", True),
    ("secs", "seconds", "{:.0f}", True),
]


def table(rows: list[dict]) -> list[str]:
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    header = ["task"] + [h + (" tree/base" if both else "") for h, _, _, both in COLUMNS]
    body = []
    for r in rows:
        line = [r["name"]]
        for _, key, fmt, both in COLUMNS:
            tree = cell(r["tree"].get(key), fmt)
            line.append(f"{tree}/{cell(r['baseline'].get(key), fmt)}" if both else tree)
        body.append(line)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths))) for x in [header, *body]]


def average(rows: list[dict]) -> dict:
    """Over the task sentences (not the presets) where both sides have a cosine."""
    both = [r for r in rows if r["preset"] is None and r["tree"].get("cosine") is not None and r["baseline"].get("cosine") is not None]
    if not both:
        return {"tasks": 0}
    tree = float(np.mean([r["tree"]["cosine"] for r in both]))
    base = float(np.mean([r["baseline"]["cosine"] for r in both]))
    wins = sum(r["tree"]["cosine"] < r["baseline"]["cosine"] for r in both)
    return {"tasks": len(both), "tree_cosine": tree, "baseline_cosine": base, "relative_difference": tree / base - 1, "tree_more_diverse": wins}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="comma-separated task names [all]")
    parser.add_argument("--samples", type=int, default=24, help="records per run [24]")
    parser.add_argument("--depth", type=int, default=2, help="tree depth [2]")
    parser.add_argument("--jobs", type=int, default=2, help="tasks run at a time [2]")
    parser.add_argument("--model", type=Path, help="a local GGUF for both sides [the embedded model]")
    parser.add_argument("--keep", type=Path, help="keep the stores and logs in this folder [a temp folder, removed]")
    parser.add_argument("--output", type=Path, default=ROOT / "quality.json", help="[quality.json at the repo root]")
    args = parser.parse_args()
    tasks = load_tasks(args.tasks.split(",") if args.tasks else None)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="treesynth-quality-"))
    folder.mkdir(parents=True, exist_ok=True)
    flags = [f.format(depth=args.depth) for f in FIXED] + sample_flags(args.samples)
    model_flags = ["--model", str(args.model)] if args.model else []
    print(f"{len(tasks)} tasks, {args.jobs} at a time, in {folder}; run flags: {' '.join(flags)}", file=sys.stderr)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda t: run_task(t, folder, flags, model_flags), tasks))
        from treesynth.engine.diversity import embed_reference, read_reference
        from treesynth.models.embed import load_embedder

        embedder = load_embedder(None)
        rows, model = [], None
        for task, run in zip(tasks, runs):
            reference = None
            if task["reference"]:
                reference = embed_reference(str(task["reference"]), read_reference(task["reference"], None, False)[0], embedder)
            tree = measure_store(run["tree_store"], task, embedder, reference)
            baseline = measure_store(run["base_store"], task, embedder, reference)
            tree.update(seconds=run["tree_seconds"], error=run["tree_error"])
            baseline.update(seconds=run["base_seconds"], error=run["base_error"])
            if model is None and run["tree_store"].exists():
                from treesynth.store import Store

                store = Store.open_existing(run["tree_store"], readonly=True)
                model = store.run().model
                store.close()
            rows.append({"name": task["name"], "description": task["description"], "preset": task["preset"], "reference": task["reference"] and str(task["reference"].relative_to(ROOT)), "tree": tree, "baseline": baseline})
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    summary = average(rows)
    report = {"revision": _revision(), "model": model, "embedder": embedder.fingerprint, "run_flags": flags, "jobs": args.jobs, "tasks": rows, "average": summary}
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    for line in table(rows):
        print(line)
    for r in rows:
        for side in ("tree", "baseline"):
            if r[side].get("error"):
                print(f"{r['name']} {side} failed: {r[side]['error']}")
    if summary["tasks"]:
        print(
            f"average over {summary['tasks']} task sentences: mean cosine tree {summary['tree_cosine']:.3f} vs baseline "
            f"{summary['baseline_cosine']:.3f} ({summary['relative_difference']:+.1%}); the tree is more diverse on "
            f"{summary['tree_more_diverse']} of {summary['tasks']}"
        )
    print(f"wrote {args.output} (revision {report['revision']}, embedder {embedder.fingerprint.get('model')})")


if __name__ == "__main__":
    main()
