"""Exact resume and deterministic reruns on the real embedded model
(SmolLM2-135M through llama.cpp), in real `treesynth run` processes.

A tiny depth-2 task runs uninterrupted in a new store; the same command on
another new store is SIGKILLed at a few seeded moments (during model load,
and at a random instant after the k-th stored call, usually mid-decode) and
run again until it finishes. Its export must be byte-identical and its calls
the same (two new stores, one seed: the same bytes); a run with another seed
must differ. The uninterrupted run decodes at the default --parallel, the
killed one at --parallel 3 (so kills land mid-batch), and one more at
--parallel 1: all three give the same bytes. One thread per process: the
thread count does not change outputs (tests/test_resume_real_model.py), and
on a shared 2-core machine one thread each is fastest."""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from helpers_proc import calls_table, consistency_problems, export_bytes, kill, start, treesynth

TASK = ["GSM8K-style grade-school math word problems", "--depth", "2", "--pivots", "3", "--max-values", "2",
        "--samples", "4", "--threads", "1", "--no-progress"]  # fmt: skip
SEED = "1"  # a depth-2 tree (two infinite splits): 35 calls, 7 samples dropped and made up, one top-up
OTHER_SEED = "2"
KILL_SEED = 11


KILLED_PARALLEL = "3"


def run_args(store: Path, seed: str = SEED, parallel: str | None = None) -> list[str]:
    return ["run", *TASK, "--seed", seed, "--store", str(store)] + (["--parallel", parallel] if parallel else [])


def stored_calls(store: Path) -> int:
    if not store.exists():
        return 0
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:  # created but not yet migrated
        return 0
    finally:
        conn.close()


def wait_for_calls(proc, store: Path, count: int, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if stored_calls(store) >= count:
            return True
        time.sleep(0.05)
    raise AssertionError(f"no {count}th stored call within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted runs, each in a new store: SEED and OTHER_SEED at the
    default --parallel, and SEED at --parallel 1; started together in the
    background so they decode while the crash series runs (one thread each).
    Returns a function that waits for a run and gives its store."""
    tmp = tmp_path_factory.mktemp("real-uninterrupted")
    runs = {}
    for seed, parallel in ((SEED, None), (OTHER_SEED, None), (SEED, "1")):
        name = f"seed{seed}-parallel{parallel or 'default'}"
        runs[seed, parallel] = (start(run_args(tmp / f"{name}.db", seed, parallel), tmp / f"{name}.txt"), tmp / f"{name}.db", tmp / f"{name}.txt")

    def finished(seed: str, parallel: str | None = None) -> Path:
        proc, store, out = runs[seed, parallel]
        assert proc.wait(timeout=1800) == 0, out.read_text()
        return store

    yield finished
    for proc, _, _ in runs.values():
        kill(proc)


def test_killed_real_runs_resume_to_the_same_bytes_and_calls(tmp_path, uninterrupted):
    rng = random.Random(KILL_SEED)
    store, out = tmp_path / "run.db", tmp_path / "out.txt"
    started = time.monotonic()
    # Kill 1: during start-up and model load. Kills 2-4: a random 0-1.5 s after the k-th
    # stored call (of 35 with SEED), mid-decode more often than not.
    targets = sorted(rng.sample(range(1, 16), 3))
    kills = 0
    proc = start(run_args(store, parallel=KILLED_PARALLEL), out)
    time.sleep(rng.uniform(0.2, 1.5))
    kills += kill(proc)
    for target in targets:
        proc = start(run_args(store, parallel=KILLED_PARALLEL), out)
        if wait_for_calls(proc, store, target):
            time.sleep(rng.uniform(0.0, 1.5))
            if kill(proc):
                kills += 1
                assert proc.returncode == -signal.SIGKILL
        if store.exists():
            assert consistency_problems(store, every_leaf_call_succeeds=False) == []
    result = treesynth(*run_args(store, parallel=KILLED_PARALLEL))
    assert result.returncode == 0, result.stderr
    assert kills >= 3, f"the run finished before its kill moments ({targets}); the tree of seed {SEED} got smaller"
    reference = uninterrupted(SEED)
    assert export_bytes(store, tmp_path / "resumed.jsonl") == export_bytes(reference, tmp_path / "reference.jsonl")
    # The same calls, each stored once, with the same answers.
    calls = calls_table(reference)
    assert calls_table(store) == calls
    # The last run sent only calls that no earlier run had stored.
    sent = int(re.search(r"(\d+) model calls sent", result.stdout).group(1))
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    last_session = conn.execute("SELECT max(id) FROM sessions").fetchone()[0]
    by_last = conn.execute("SELECT count(*) FROM calls WHERE session = ?", [last_session]).fetchone()[0]
    conn.close()
    assert sent == by_last < len(calls)
    print(f"\n{len(calls)} calls; {kills} kills; the last run sent {sent}; {time.monotonic() - started:.1f} s")


def test_a_new_store_with_another_seed_gives_other_bytes(tmp_path, uninterrupted):
    reference, other = uninterrupted(SEED), uninterrupted(OTHER_SEED)
    other_bytes = export_bytes(other, tmp_path / "other.jsonl")
    assert other_bytes and other_bytes != export_bytes(reference, tmp_path / "reference.jsonl")
    assert {row[0] for row in calls_table(other)}.isdisjoint(row[0] for row in calls_table(reference))


def test_parallel_changes_neither_the_export_nor_the_calls(tmp_path, uninterrupted):
    default, one = uninterrupted(SEED), uninterrupted(SEED, "1")
    assert export_bytes(one, tmp_path / "one.jsonl") == export_bytes(default, tmp_path / "default.jsonl")
    assert calls_table(one) == calls_table(default)
    conn = sqlite3.connect(f"file:{default}?mode=ro", uri=True)
    settings = conn.execute("SELECT settings FROM sessions").fetchone()[0]
    conn.close()
    assert '"parallel":8' in settings.replace(" ", "")  # the default, recorded with the session
