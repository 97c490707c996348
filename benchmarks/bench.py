"""`make bench`: constrained against unconstrained decoding, side by side.

For each model (the embedded SmolLM2-135M, and Gemma 3 270M from the
``bench`` extra: a 262k-token vocabulary), in a fresh process of its own so
that the cold start and the peak RSS are that model's:

- the cold start: set-up of the process's first constrained call (imports,
  the llguidance tokenizer, one compile);
- per engine schema (pivots, criterion, coverage, leaf; prompts from
  engine/prompts.py): a constrained call, then the same prompt unconstrained
  for as many tokens, repeated; decode tokens/s of each, their ratio, set-up
  ms of the schema's first call (its compile) and of later calls;
- engine overhead: a small depth-2 TreeSynth run; wall time minus the model's
  time, as a share of wall time;
- why this constraint path: per-token mask cost and compile cost of outlines'
  llguidance backend (chosen) against an ``outlines_core`` Index, and the
  per-token cost of the sampler against masking the whole vocabulary;
- batched decoding: aggregate decode tokens/s of 1/2/4/8/16 sequences in one
  context, raw (unconstrained, greedy) beside constrained on each engine
  schema, each sequence its own prompt and seed;
- end to end (the embedded model): a fixed depth-2 run at ``--parallel 1``
  and at the default, wall time and whether the two exports are the same bytes;
- with ``--llama-server PATH`` (llama.cpp's server binary; nothing in the
  repo builds it), the same end-to-end run against a local llama-server
  serving the embedded model with 1 slot and with ``--server-slots`` (4)
  slots: wall time each, and whether the two exports are the same bytes.

llama.cpp runs with one thread unless ``--threads`` says otherwise: on a
machine that other processes share, two threads that wait on each other made
decoding 4 to 35 times slower from one call to the next, and the timings
meaningless.

Writes bench.json (``--out``) and prints a table. A benchmark, not a test:
``--quick`` is a tiny run that CI uses to check that it works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = {"ratio": 0.9, "setup_ms_later": 10.0, "engine_overhead_pct": 5.0, "batched_ratio": 0.9, "end_to_end_speedup": 1.5}
DESCRIPTION = "GSM8K-style grade-school math word problems"
PIVOTS = [
    {"text": "Sam has 5 apples and buys 3 more. How many apples does he have now?"},
    {"text": "A train travels 60 miles per hour for 3 hours. How far does it go?"},
    {"text": "Lisa bakes 24 cookies and gives away half of them. How many are left?"},
    {"text": "A book costs $12 and a pen costs $3. What do 2 books and 4 pens cost?"},
]
ROLES = ("pivots", "criterion", "coverage", "leaf")


@dataclasses.dataclass(frozen=True)
class Scale:
    samples: int  # n of the sample arrays and of the criterion's labels
    max_tokens: int
    reps: int
    tree: dict[str, Any]  # the TreeSynth run for the engine overhead
    compare_paths: bool


FULL = Scale(
    3, 512, 3, {"depth": 2, "pivots": 3, "leaf_samples": 2, "max_values": 3, "infinite_samples": 1, "max_samples": 8, "max_tokens": 512}, True
)
# Quick: seed 12, whose one leaf call is kept (at seed 7, 64-token answers
# were cut off and dropped: 3 calls for one sample, here and end to end).
QUICK = Scale(2, 16, 2, {"depth": 0, "leaf_samples": 1, "max_tokens": 64, "seed": 12}, False)
# Batched decoding: sequences at once, and tokens each sequence may take.
BATCH_SIZES, BATCH_TOKENS = (1, 2, 4, 8, 16), 96
QUICK_BATCH_SIZES, QUICK_BATCH_TOKENS = (1, 2), 12
# Quick: the two schemas with short prompts (the criterion's and coverage's
# few-shot prompts of 180-230 tokens took 6 of the quick section's 9 s).
QUICK_BATCH_ROLES = ("pivots", "leaf")
# The end-to-end run at --parallel 1 and at the default (the embedded model only).
END_TO_END = {"depth": 2, "pivots": 4, "max_values": 4, "samples": 24, "seed": 7}
# Quick: the root alone (a depth-1 tree spends most of its time on three
# criterion prompts of ~400 tokens, and doubled the quick bench)
QUICK_END_TO_END = {"depth": 0, "samples": 1, "leaf_samples": 1, "seed": 12, "max_tokens": 64}


# -- models ------------------------------------------------------------------------


from treesynth.models.embedded import gemma_path  # noqa: E402 (the bench's second model)


def smollm2_path() -> Path:
    from treesynth.models.embedded import default_model_path

    return default_model_path()


MODELS = {"smollm2-135m": smollm2_path, "gemma3-270m": gemma_path}


# -- requests ------------------------------------------------------------------------


def requests(scale: Scale) -> dict[str, Any]:
    from treesynth.engine import prompts
    from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA
    from treesynth.engine.schemas import coverage_schema, criterion_schema, samples_schema
    from treesynth.models.base import Request

    n, sample = scale.samples, DEFAULT_SAMPLE_SCHEMA
    pivots = PIVOTS[:n]

    def request(messages, schema, temperature, seed):
        return Request(messages, schema, scale.max_tokens, temperature, 0.95, seed)

    return {
        "pivots": request(prompts.pivots_messages(DESCRIPTION, [], sample, n), samples_schema(sample, n), 0.9, 11),
        "criterion": request(prompts.criterion_messages(DESCRIPTION, [], pivots, []), criterion_schema(n), 0.5, 12),
        "coverage": request(
            prompts.coverage_messages(DESCRIPTION, [("topic", "shopping")], "numbers used", ["whole numbers", "fractions"]),
            coverage_schema(),
            0.5,
            13,
        ),
        "leaf": request(
            prompts.leaf_messages(DESCRIPTION, [("topic", "shopping"), ("numbers used", "fractions")], sample, n),
            samples_schema(sample, n),
            0.9,
            14,
        ),
    }


def scripted_answer(role: str, n: int) -> str:
    """A valid answer for each schema, to walk the constraint without the model."""
    if role in ("pivots", "leaf"):
        return json.dumps(PIVOTS[:n], separators=(",", ":"))
    if role == "criterion":
        return json.dumps({"dimension": "topic", "labels": ["shopping", "travel", "baking", "school"][:n]}, separators=(",", ":"))
    return json.dumps({"status": "infinite", "new_values": ["percentages", "decimals", "money"]}, separators=(",", ":"))


# -- one model, in its own process ------------------------------------------------------


def measure_model(name: str, scale: Scale, threads: int | None) -> dict[str, Any]:
    from treesynth.models.llamacpp import LlamaCppModel
    from treesynth.models.base import Request

    started = time.perf_counter()
    model = LlamaCppModel(MODELS[name](), threads=threads)
    result: dict[str, Any] = {"name": name, "file": model.path.name, "n_vocab": model.n_vocab, "threads": model.threads}
    result["load_s"] = time.perf_counter() - started

    # The process's first constrained call, on a schema no step uses.
    warm = Request((("user", "Answer with JSON."),), {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, 8, 0.0, 1.0, 0)
    first = model.generate([warm])[0]
    result["cold_start_s"] = first.extra["setup_seconds"]
    result["cold_start_call_s"] = first.seconds

    schemas: dict[str, Any] = {}
    con_tokens = con_seconds = unc_tokens = unc_seconds = 0.0
    for role, request in requests(scale).items():
        runs = []
        tokens = None
        for rep in range(scale.reps):
            # Constrained, and the same prompt unconstrained for as many tokens
            # (the constrained answer is the same every time: same seed); the
            # order alternates so that a drift in the machine's load cancels out.
            unc = None
            if tokens is not None and rep % 2:
                unc = model.generate([dataclasses.replace(request, schema=None, max_tokens=tokens)])[0]
            con = model.generate([request])[0]
            tokens = tokens or max(con.completion_tokens, 1)
            if unc is None:
                unc = model.generate([dataclasses.replace(request, schema=None, max_tokens=tokens)])[0]
            runs.append((con, unc))
        entry = _schema_entry(role, request.schema, runs)
        schemas[role] = entry
        con_tokens += sum(c.completion_tokens for c, _ in runs)
        con_seconds += sum(c.extra["decode_seconds"] for c, _ in runs)
        unc_tokens += sum(u.completion_tokens for _, u in runs)
        unc_seconds += sum(u.extra["decode_seconds"] for _, u in runs)
    result["unconstrained_tok_s"] = unc_tokens / unc_seconds if unc_seconds else 0.0
    result["constrained_tok_s"] = con_tokens / con_seconds if con_seconds else 0.0
    result["schemas"] = schemas
    result.update(engine_overhead(model, scale))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quick = scale is QUICK
    result["batched"] = (
        batched(model, scale, QUICK_BATCH_SIZES, QUICK_BATCH_TOKENS, QUICK_BATCH_ROLES) if quick else batched(model, scale, BATCH_SIZES, BATCH_TOKENS)
    )
    if name == "smollm2-135m":
        result["end_to_end"] = end_to_end(QUICK_END_TO_END if quick else END_TO_END, threads)
    if scale.compare_paths:  # after the RSS reading: an outlines_core Index takes hundreds of MB
        result["paths"] = compare_paths(model, scale)
    result["meets_targets"] = _meets(result)
    return result


def _schema_entry(role: str, schema: dict, runs: list) -> dict[str, Any]:
    con_tok = sum(c.completion_tokens for c, _ in runs)
    unc_tok = sum(u.completion_tokens for _, u in runs)
    con_s = sum(c.extra["decode_seconds"] for c, _ in runs)
    unc_s = sum(u.extra["decode_seconds"] for _, u in runs)
    tok_s = con_tok / con_s if con_s else 0.0
    unc_tok_s = unc_tok / unc_s if unc_s else 0.0

    def overhead_ms(responses):  # the decode loop's time outside llama.cpp, per token
        tokens = sum(r.completion_tokens for r in responses)
        return 1000 * sum(r.extra["decode_seconds"] - r.extra["eval_seconds"] for r in responses) / max(tokens, 1)

    eval_ms = 1000 * sum(u.extra["eval_seconds"] for _, u in runs) / max(unc_tok, 1)
    con_over, unc_over = overhead_ms([c for c, _ in runs]), overhead_ms([u for _, u in runs])
    return {
        "tok_s": tok_s,
        "unconstrained_tok_s": unc_tok_s,
        # The median of each pair's ratio: a pair ran back to back, under the same load.
        "ratio": statistics.median(_tok_s(c) / _tok_s(u) if _tok_s(u) else 0.0 for c, u in runs),
        # The same ratio with llama.cpp's time per token held equal: what the
        # constraint itself costs, free of other load on the machine.
        "ratio_at_equal_model_time": (eval_ms + unc_over) / (eval_ms + con_over) if eval_ms + con_over else 0.0,
        "overhead_ms_per_token": {"constrained": con_over, "unconstrained": unc_over},
        "model_ms_per_token": eval_ms,
        "setup_ms_first": 1000 * runs[0][0].extra["setup_seconds"],
        "setup_ms_later": 1000 * statistics.median(c.extra["setup_seconds"] for c, _ in runs[1:]) if len(runs) > 1 else None,
        "tokens": con_tok // len(runs),
        "finish_reason": runs[0][0].finish_reason,
        "valid_json": _valid(runs[0][0].text, schema),  # false when cut off at max_tokens
        "deterministic": len({c.text for c, _ in runs}) == 1,
    }


def _tok_s(response) -> float:
    return response.completion_tokens / response.extra["decode_seconds"] if response.extra["decode_seconds"] else 0.0


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def engine_overhead(model, scale: Scale) -> dict[str, Any]:
    """A small TreeSynth run on this model: wall time minus the model's time."""
    from treesynth.engine.runs import load_embedder, method_of, open_run_store
    from treesynth.engine.config import build_config
    from treesynth.engine.events import RunFinished
    from treesynth.engine.tree import TreeSynth

    config = build_config({"description": DESCRIPTION, "seed": 7, **scale.tree}, {})
    embedder = load_embedder()  # judging samples and criteria is engine time, not model time
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = open_run_store(Path(tmp) / "bench.db", config, model.fingerprint, method_of(embedder))
        try:
            finished = [e for e in TreeSynth(config, model, store, embedder).run() if isinstance(e, RunFinished)][-1]
        finally:
            store.close()
    wall, spent = finished.wall_seconds, finished.model_seconds
    return {
        "engine_overhead_pct": 100 * (wall - spent) / wall if wall else 0.0,
        "engine_run": {"tree": scale.tree, "calls": finished.calls_sent, "samples": finished.samples, "wall_s": wall, "model_s": spent},
    }


def batched(model, scale: Scale, sizes: tuple[int, ...], tokens: int, roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
    """Aggregate decode tokens/s of n sequences in one context (n in ``sizes``):
    each sequence its own prompt (a subspace of its own) and seed. Per schema,
    constrained first, then raw (unconstrained, greedy) on the same prompts
    for as many tokens each; the decode phase only (prompts are evaluated
    alone, before it). The model, or one like it with room for the largest n."""
    from treesynth.models.llamacpp import LlamaCppModel

    own = model.parallel < max(sizes)
    wide = LlamaCppModel(model.path, n_ctx=2048, threads=model.threads, parallel=max(sizes), gpu_layers=model.gpu_layers) if own else model
    base = requests(dataclasses.replace(scale, max_tokens=tokens))
    topics = ["shopping", "travel", "baking", "school", "sports", "garden", "money", "time",
              "animals", "music", "weather", "books", "cars", "trains", "art", "food"]  # fmt: skip
    out: dict[str, Any] = {"sizes": list(sizes), "max_tokens": tokens, "parallel": wide.parallel, "offload": wide.fingerprint["offload"], "schemas": {}}
    for role in roles:
        request, rows = base[role], []
        for n in sizes:
            group = [_with_topic(request, topics[i % len(topics)] + (f" {i // len(topics)}" if i >= len(topics) else ""), 1000 * n + i) for i in range(n)]
            con = wide.generate(group)
            raw = wide.generate([dataclasses.replace(r, schema=None, temperature=0.0, max_tokens=max(c.completion_tokens, 1)) for r, c in zip(group, con)])
            rows.append({"n": n, "constrained_tok_s": _aggregate(con), "raw_tok_s": _aggregate(raw),
                         "tokens": sum(c.completion_tokens for c in con)})  # fmt: skip
        for row in rows:
            row["ratio"] = row["constrained_tok_s"] / row["raw_tok_s"] if row["raw_tok_s"] else 0.0
        out["schemas"][role] = rows
    if own:
        wide.close()
    return out


def _with_topic(request, topic: str, seed: int):
    """The request with its subspace's value (or, for the criterion, the task) made the sequence's own."""
    messages = tuple((role, text.replace("shopping", topic) if "shopping" in text else text + f" ({topic})") if i == len(request.messages) - 1 else (role, text)
                     for i, (role, text) in enumerate(request.messages))  # fmt: skip
    return dataclasses.replace(request, messages=messages, seed=seed)


def _aggregate(responses) -> float:
    seconds = sum(r.extra["decode_seconds"] for r in responses)  # shares of each step: they add up to the loop's wall time
    return sum(r.completion_tokens for r in responses) / seconds if seconds else 0.0


def _run_task(config, embedder, model) -> dict[str, Any]:
    """The bench's run of ``config`` on ``model`` in a new temporary store:
    wall seconds, calls sent, samples and the export's text."""
    from treesynth.engine.events import RunFinished
    from treesynth.engine.export import iter_records
    from treesynth.engine.runs import method_of, open_run_store
    from treesynth.engine.tree import TreeSynth

    with tempfile.TemporaryDirectory() as tmp:
        store, _ = open_run_store(Path(tmp) / "e2e.db", config, model.fingerprint, method_of(embedder))
        try:
            finished = [e for e in TreeSynth(config, model, store, embedder).run() if isinstance(e, RunFinished)][-1]
            export = "".join(iter_records(store, list(config.sample_schema["properties"])))
        finally:
            store.close()
    return {"wall_s": finished.wall_seconds, "calls": finished.calls_sent, "samples": finished.samples, "export": export}


def end_to_end(task: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """A fixed run on the embedded model at --parallel 1 and at the default:
    wall seconds each, the speed-up, and whether the exports are the same bytes."""
    from treesynth.engine.config import build_config
    from treesynth.engine.runs import load_embedder
    from treesynth.models.llamacpp import DEFAULT_PARALLEL, LlamaCppModel

    config = build_config({"description": DESCRIPTION, **task}, {})
    embedder = load_embedder()
    runs = {}
    for parallel in (1, DEFAULT_PARALLEL):
        model = LlamaCppModel(smollm2_path(), threads=threads, parallel=parallel)
        runs[parallel] = _run_task(config, embedder, model)
        model.close()
    one, default = runs[1], runs[DEFAULT_PARALLEL]
    return {
        "task": task,
        "default_parallel": DEFAULT_PARALLEL,
        "wall_s": {"1": one["wall_s"], str(DEFAULT_PARALLEL): default["wall_s"]},
        "calls": one["calls"],
        "samples": one["samples"],
        "speedup": one["wall_s"] / default["wall_s"] if default["wall_s"] else 0.0,
        "same_export": one["export"] == default["export"] and one["calls"] == default["calls"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_llama_server(binary: Path, slots: int, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    """llama-server on the embedded model, ``slots`` slots of ``n_ctx`` tokens,
    on a free local port; returns once /health answers 200."""
    import urllib.request

    port = _free_port()
    command = [str(binary), "-m", str(smollm2_path()), "--alias", "smollm2-135m", "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(n_ctx * slots), "-t", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {server.returncode}: {' '.join(command)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("llama-server did not become healthy within 120 s")


def server_end_to_end(task: dict[str, Any], binary: Path, slot_counts: tuple[int, ...], threads: int) -> dict[str, Any]:
    """The end-to-end run against llama-server with each slot count: wall
    seconds, calls, and whether every slot count gave the same export bytes."""
    from treesynth.engine.config import build_config
    from treesynth.engine.runs import load_embedder
    from treesynth.models.loader import ServerOptions, load_server

    config = build_config({"description": DESCRIPTION, **task}, {})
    embedder = load_embedder()
    runs = {}
    for slots in slot_counts:
        server, url = _start_llama_server(binary, slots, threads, 4096)
        try:
            runs[slots] = _run_task(config, embedder, load_server(ServerOptions(urls=(url,))))
        finally:
            server.terminate()
            server.wait(timeout=30)
    first = runs[slot_counts[0]]
    return {
        "task": task,
        "server": binary.name,
        "threads": threads,
        "wall_s": {str(n): r["wall_s"] for n, r in runs.items()},
        "calls": {str(n): r["calls"] for n, r in runs.items()},
        "samples": first["samples"],
        "speedup": first["wall_s"] / runs[slot_counts[-1]]["wall_s"] if runs[slot_counts[-1]]["wall_s"] else 0.0,
        "same_export": all(r["export"] == first["export"] and r["calls"] == first["calls"] for r in runs.values()),
    }


def compare_paths(model, scale: Scale) -> dict[str, Any]:
    """Why llguidance: compile and per-token mask cost of each outlines backend
    on the same schema and answer, and the sampler against whole-vocabulary masking."""
    import llguidance

    role = "criterion"  # the smallest outlines_core index of the four
    schema = requests(scale)[role].schema
    tokens = model.llm.tokenize(scripted_answer(role, scale.samples).encode(), add_bos=False, special=False)
    words = np.zeros((model.n_vocab + 31) // 32, dtype="<u4")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(model.n_vocab) * 3).astype(np.float32)

    started = time.perf_counter()
    backend = model.guidance()
    matcher = llguidance.LLMatcher(backend.llg_tokenizer, backend.get_json_schema_logits_processor(json.dumps(schema)).grammar)
    compile_ms = 1000 * (time.perf_counter() - started)
    mask_us, candidates_us, whole_us = [], [], []
    for token in tokens:
        tick = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        mask_us.append(1e6 * (time.perf_counter() - tick))
        candidates_us.append(_time_us(lambda: _sample_candidates(logits, words)))
        whole_us.append(_time_us(lambda: _sample_whole_vocabulary(logits, words)))
        matcher.consume_token(token)
    paths: dict[str, Any] = {
        "schema": role,
        "llguidance": {"compile_ms": compile_ms, "mask_us_per_token": statistics.mean(mask_us)},
        "sampler_us_per_token": {
            "allowed_candidates": statistics.mean(candidates_us),
            "whole_vocabulary_mask": statistics.mean(whole_us),
        },
    }
    try:
        paths["outlines_core"] = _outlines_core(model, schema, tokens, words)
    except Exception as error:  # a comparison only: report it, keep the bench
        paths["outlines_core"] = {"error": f"{type(error).__name__}: {error}"}
    return paths


def _outlines_core(model, schema, tokens, words) -> dict[str, Any]:
    import outlines
    from outlines.backends.outlines_core import OutlinesCoreBackend
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    vocabulary = OutlinesCoreBackend(outlines.from_llamacpp(model.llm)).vocabulary
    vocabulary_s = time.perf_counter() - started
    started = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(schema), ""), vocabulary))
    index_s = time.perf_counter() - started
    mask_us = []
    for token in tokens:
        tick = time.perf_counter()
        guide.write_mask_into(words.ctypes.data, words.size, 4)
        mask_us.append(1e6 * (time.perf_counter() - tick))
        guide.advance(token, return_tokens=False)
    return {"vocabulary_s": vocabulary_s, "index_s": index_s, "mask_us_per_token": statistics.mean(mask_us)}


def _sample_candidates(logits, words) -> int:
    from treesynth.models.llamacpp import allowed_candidates, sample_candidates

    ids = allowed_candidates(logits, words)
    return sample_candidates(ids, logits[ids], 0.9, 0.95, np.random.default_rng(0))


def _sample_whole_vocabulary(logits, words) -> int:
    """The path before issue 4: -inf over every disallowed token, then top-k over the vocabulary."""
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: logits.shape[0]].view(bool)
    masked = np.where(allowed, logits, -np.inf)
    top = np.argpartition(masked, -40)[-40:]
    return int(top[np.lexsort((top, -masked[top]))][0])


def _time_us(fn) -> float:
    tick = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - tick)


def _meets(result: dict[str, Any]) -> dict[str, bool]:
    schemas = result["schemas"].values()
    later = [s["setup_ms_later"] for s in schemas if s["setup_ms_later"] is not None]
    widest = [rows[-1] for rows in result["batched"]["schemas"].values()]
    meets = {
        "ratio": all(s["ratio"] >= TARGETS["ratio"] for s in schemas),
        "setup_ms_later": all(ms <= TARGETS["setup_ms_later"] for ms in later),
        "engine_overhead_pct": result["engine_overhead_pct"] <= TARGETS["engine_overhead_pct"],
        "batched_ratio": all(row["ratio"] >= TARGETS["batched_ratio"] for row in widest),
    }
    if "end_to_end" in result:
        e2e = result["end_to_end"]
        meets["end_to_end_speedup"] = e2e["speedup"] >= TARGETS["end_to_end_speedup"] and e2e["same_export"]
    return meets


# -- driver --------------------------------------------------------------------------------


def run_worker(name: str, quick: bool, threads: int | None) -> dict[str, Any]:
    """Measure one model in a fresh process; a failure becomes an error entry."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(out)]
        command += (["--quick"] if quick else []) + ([f"--threads={threads}"] if threads else [])
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"name": name, "error": lines[-1] if lines else f"exit code {done.returncode}"}


def table(report: dict[str, Any]) -> str:
    rows = []
    for m in report["models"]:
        if "error" in m:
            rows.append(f"{m['name']}: NOT MEASURED: {m['error']}")
            continue
        rows.append(
            f"{m['name']} (vocab {m['n_vocab']}, {m['threads']} llama.cpp thread{'' if m['threads'] == 1 else 's'}): unconstrained {m['unconstrained_tok_s']:.1f} tok/s, "
            f"cold start {m['cold_start_s']:.2f} s, engine overhead {m['engine_overhead_pct']:.1f} %, peak RSS {m['peak_rss_mb']:.0f} MB"
        )
        rows.append(f"  {'schema':<10}{'tok/s':>8}{'ratio':>7}{'ratio@eq':>9}{'setup1 ms':>11}{'setup ms':>10}{'ovh ms/tok':>12}  valid")
        for role, s in m["schemas"].items():
            later = f"{s['setup_ms_later']:.2f}" if s["setup_ms_later"] is not None else "-"
            valid = "cut" if s["finish_reason"] == "length" else str(s["valid_json"])
            rows.append(
                f"  {role:<10}{s['tok_s']:>8.1f}{s['ratio']:>7.2f}{s['ratio_at_equal_model_time']:>9.3f}"
                f"{s['setup_ms_first']:>11.2f}{later:>10}{s['overhead_ms_per_token']['constrained']:>12.3f}  {valid}"
            )
        paths = m.get("paths")
        if paths:
            oc = paths["outlines_core"]
            core = f"index {oc['index_s']:.1f} s, mask {oc['mask_us_per_token']:.0f} us/token" if "index_s" in oc else oc["error"]
            rows.append(
                f"  paths ({paths['schema']}): llguidance compile {paths['llguidance']['compile_ms']:.2f} ms, "
                f"mask {paths['llguidance']['mask_us_per_token']:.0f} us/token; outlines_core {core}; sampler "
                f"{paths['sampler_us_per_token']['allowed_candidates']:.0f} us/token vs whole-vocabulary mask "
                f"{paths['sampler_us_per_token']['whole_vocabulary_mask']:.0f}"
            )
        b = m["batched"]
        rows.append(f"  batched decode, aggregate tok/s (raw greedy / constrained / ratio), up to {b['max_tokens']} tokens a sequence:")
        rows.append("  " + f"{'schema':<10}" + "".join(f"{'n=' + str(n):>23}" for n in b["sizes"]))
        for role, entries in b["schemas"].items():
            cells = "".join(f"{e['raw_tok_s']:>9.0f} /{e['constrained_tok_s']:>5.0f} /{e['ratio']:>5.2f}" for e in entries)
            rows.append(f"  {role:<10}{cells}")
        e2e = m.get("end_to_end")
        if e2e:
            walls = " vs ".join(f"--parallel {k}: {v:.1f} s" for k, v in e2e["wall_s"].items())
            rows.append(
                f"  end to end ({e2e['calls']} calls, {e2e['samples']} samples): {walls}, speed-up {e2e['speedup']:.2f}x, "
                f"same export: {e2e['same_export']}"
            )
        rows.append(f"  targets met: {m['meets_targets']}")
    server = report.get("server_end_to_end")
    if server and "error" in server:
        rows.append(f"server end to end: NOT MEASURED: {server['error']}")
    elif server:
        walls = " vs ".join(f"{k} slot{'' if k == '1' else 's'}: {v:.1f} s" for k, v in server["wall_s"].items())
        calls = "/".join(str(c) for c in server["calls"].values())
        rows.append(
            f"server end to end ({server['server']}, embedded model, -t {server['threads']}; {calls} calls, {server['samples']} samples): "
            f"{walls}, speed-up {server['speedup']:.2f}x, same export: {server['same_export']}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (CI): the embedded model only, few tokens")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON report [bench.json]")
    parser.add_argument("--models", default=None, help=f"comma-separated, of: {', '.join(MODELS)} [all; --quick: smollm2-135m]")
    parser.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads [1: steady timings on a machine that other processes share]"
    )
    parser.add_argument(
        "--llama-server", type=Path, default=None,
        help="llama.cpp's llama-server binary: also run the end-to-end task against it with 1 and --server-slots slots",
    )
    parser.add_argument("--server-slots", type=int, default=4, help="slots of the several-slot server run [4]")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    threads = args.threads
    if args.worker:
        args.out.write_text(json.dumps(measure_model(args.worker, scale, threads), indent=1))
        return 0
    names = args.models.split(",") if args.models else (["smollm2-135m"] if args.quick else list(MODELS))
    if args.llama_server and not args.llama_server.is_file():
        print(f"--llama-server {args.llama_server}: no such file (llama.cpp's llama-server binary)", file=sys.stderr)
        return 2
    if args.server_slots < 2:
        print(f"--server-slots must be at least 2, not {args.server_slots}", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": os.getloadavg()[0]},
        "quick": args.quick,
        # Samples one leaf request of the bench asks for (plan reads tokens per sample from it).
        "leaf_request_samples": (QUICK if args.quick else FULL).samples,
        "targets": TARGETS,
        "models": [run_worker(name, args.quick, threads) for name in names],
    }
    # Other processes' load slows the model between one call and the next: the
    # wall-clock ratio is only as steady as the machine; ratio_at_equal_model_time is not.
    if args.llama_server:
        try:
            task = QUICK_END_TO_END if args.quick else END_TO_END
            report["server_end_to_end"] = server_end_to_end(task, args.llama_server, (1, args.server_slots), threads)
        except Exception as error:  # noqa: BLE001 - reported in the table, as a model that could not be measured is
            report["server_end_to_end"] = {"error": f"{type(error).__name__}: {error}"}
    report["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    missing = [m for m in report["models"] if "error" in m]
    for m in missing:
        print(f"{m['name']} was not measured: {m['error']}", file=sys.stderr)
    server_error = report.get("server_end_to_end", {}).get("error")
    if server_error:
        print(f"the server run was not measured: {server_error}", file=sys.stderr)
    return 1 if missing or server_error else 0


if __name__ == "__main__":
    sys.exit(main())
