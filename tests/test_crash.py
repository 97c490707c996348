"""Exact resume, proven by killing real processes: `treesynth run` on the fake
model (each answer takes 20 ms where kills are timed by the clock) is
SIGKILLed at many seeded moments and run again with the same command until
it finishes. The export must be byte-identical to an uninterrupted run, and
the fake model's call log must show that no request whose answer was stored
was ever sent again: each kill loses at most the batch in flight."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from treesynth.engine.calls import BATCH_PER_SEQUENCE
from helpers_proc import (
    lost_in_flight,
    FAKE_TASK,
    calls_table,
    consistency_problems,
    env_with,
    export_bytes,
    kill,
    log_lines,
    start,
    stored_requests,
    treesynth_in_process,
    wait_for_lines,
)

TIMED_KILLS = 30
COMMIT_KILL_SEED = 5


def run_args(store: Path, log: Path, delay: str = "0.02") -> list[str]:
    """The fake model's delay changes no answer; kills at timed moments need it,
    and runs that are not killed by the clock go without (146 calls: 3 s)."""
    return ["run", *FAKE_TASK, "--store", str(store), "--model", f"fake:delay={delay},log={log}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run: its export, its call log, its calls table."""
    tmp = tmp_path_factory.mktemp("reference")
    store, log = tmp / "ref.db", tmp / "ref.log"
    result = treesynth_in_process(*run_args(store, log, delay="0"))  # nothing to kill: in this process
    assert result.returncode == 0, result.stderr
    lines = log_lines(log)
    assert len(lines) == len(set(lines)) > 100
    return {"export": export_bytes(store, tmp / "ref.jsonl"), "log": lines, "calls": calls_table(store)}


class Series:
    """Runs of one command on one store, each checked after it ends."""

    def __init__(self, tmp: Path, delay: str = "0.02"):
        self.store, self.log, self.out = tmp / "run.db", tmp / "calls.log", tmp / "out.txt"
        self.delay = delay
        self.kills = 0
        self.lost = 0  # requests sent but not stored: in flight at a kill
        self.stored_before: set[str] = set()

    def args(self) -> list[str]:
        return run_args(self.store, self.log, self.delay)

    def check_after_run(self, sent: list[str], killed: bool) -> None:
        stored = stored_requests(self.store)
        resent = [r for r in sent if r in self.stored_before]
        assert not resent, f"{len(resent)} requests whose answers were stored were sent again"
        # Only the batch in flight when the process died may be missing from the store.
        unstored = lost_in_flight(sent, stored)
        assert killed or unstored == []
        self.lost += len(unstored)
        if self.store.exists():
            assert consistency_problems(self.store) == []
        self.stored_before = stored

    def finish_checks(self, reference: dict, tmp: Path) -> None:
        assert export_bytes(self.store, tmp / "resumed.jsonl") == reference["export"]
        assert calls_table(self.store) == reference["calls"]
        lines = log_lines(self.log)
        assert len(lines) == len(reference["log"]) + self.lost
        assert self.lost <= self.kills * BATCH_PER_SEQUENCE
        # The same requests in the same order: a resumed run only repeats those lost in flight.
        assert list(dict.fromkeys(lines)) == reference["log"]
        assert not list(self.store.parent.glob(".run.db.creating-*"))
        verified = treesynth_in_process("verify", str(self.store))
        assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stdout


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, reference):
    """Kills at seeded moments: some 0-0.4 s after start (start-up, store
    creation, replaying stored calls), most a random 0-30 ms after the k-th (1-4) new
    request was sent (waiting for the model, committing, between steps)."""
    rng = random.Random(20240611)
    series = Series(tmp_path)
    started = time.monotonic()
    while True:
        before = len(log_lines(series.log))
        proc = start(series.args(), series.out)
        killed = False
        if series.kills < TIMED_KILLS:
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.4))
                killed = kill(proc)
            elif wait_for_lines(proc, series.log, before + rng.randint(1, 4)):
                time.sleep(rng.uniform(0.0, 0.03))
                killed = kill(proc)
        if not killed:
            assert proc.wait(timeout=300) == 0, series.out.read_text()
        else:
            assert proc.returncode == -signal.SIGKILL
            series.kills += 1
        series.check_after_run(log_lines(series.log)[before:], killed)
        if not killed:
            break
    series.finish_checks(reference, tmp_path)
    assert series.kills >= TIMED_KILLS * 0.8  # a few runs may finish before their kill moment
    print(f"\n{series.kills} kills, {series.lost} requests lost in flight, {time.monotonic() - started:.1f} s")


def test_sigkill_inside_transactions_resumes_exactly(tmp_path, reference):
    """Kills inside a commit, after the step's rows are written and before
    COMMIT (the store's documented TREESYNTH_TEST_KILL_IN_COMMIT hook): run k
    dies in its n_k-th transaction, n_k seeded, the first run in its very first
    one (the root node's)."""
    rng = random.Random(COMMIT_KILL_SEED)
    series = Series(tmp_path, delay="0")  # the kills come from the store's hook, not the clock
    n = 1
    while True:
        before = len(log_lines(series.log))
        proc = start(series.args(), series.out, env=env_with(TREESYNTH_TEST_KILL_IN_COMMIT=str(n)))
        code = proc.wait(timeout=300)
        killed = code == -signal.SIGKILL
        assert killed or code == 0, series.out.read_text()
        series.kills += killed
        series.check_after_run(log_lines(series.log)[before:], killed)
        if not killed:
            break
        n = rng.randint(1, 12)
    series.finish_checks(reference, tmp_path)
    assert series.kills >= 15
    print(f"\n{series.kills} kills inside transactions, {series.lost} requests lost in flight")
