"""Run ``treesynth`` as a real process, kill it, and read what it left behind:
helpers for the crash and resume tests.

The fake model's ``log=FILE`` option appends one line per request SENT (the
canonical JSON of the request, written before the answer is made), which is
exactly the form the store keeps in ``calls.request``: comparing the two shows
which sent requests were stored and whether a stored one was sent again."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TREESYNTH = [sys.executable, "-m", "treesynth"]

# A fake-model task whose tree has 10 nodes (5 split, 5 leaves), built with 144
# model calls; 33 of its samples are dropped as near duplicates and made up by
# more requests: big enough to kill at many moments, small enough to run
# dozens of times.
FAKE_TASK = ["short math word problems", "--depth", "3", "--pivots", "3", "--max-values", "3", "--samples", "60",
             "--seed", "1", "--no-progress"]  # fmt: skip


def treesynth(*args: str, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(TREESYNTH + list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


def treesynth_in_process(
    *args: Any, env: dict[str, str] | None = None, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """The command in this process (typer's runner), as a completed process,
    run in CWD if given, INPUT its standard input (empty if None): an
    exception that escapes ends with exit code 1, not 2. For every test that
    needs no real process (no signal, no second process on the store, no
    resource limit): a `treesynth` process costs 0.5-0.9 s of start-up."""
    from contextlib import chdir, nullcontext

    from typer.testing import CliRunner

    from treesynth.engine.cli import app

    with chdir(cwd) if cwd is not None else nullcontext():
        result = CliRunner().invoke(app, [str(a) for a in args], env=env, input=input)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def start(args: list[str], out: Path, **kwargs: Any) -> subprocess.Popen:
    """Start ``treesynth ARGS`` with stdout and stderr going to OUT (a file, so a
    full pipe can never stall the process we mean to kill)."""
    handle = open(out, "ab")
    try:
        return subprocess.Popen(TREESYNTH + args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
    finally:
        handle.close()


def log_lines(log: Path) -> list[str]:
    """The call log's whole request lines. A line that SIGKILL cut short (the
    kernel may stop a write between pages of the file) is a request that was
    never answered, since the fake model logs before it answers: it is left
    out, as if never sent. Only such a torn line may fail to parse."""
    if not log.exists():
        return []
    lines = []
    for line in log.read_bytes().decode("utf-8", errors="replace").split("\n"):
        try:
            if isinstance(json.loads(line), dict):
                lines.append(line)
        except ValueError:
            pass  # empty, or torn by a kill
    return lines


def wait_for_lines(proc: subprocess.Popen, log: Path, count: int, timeout: float = 120) -> bool:
    """Wait until the call log holds COUNT lines; False if the process ended first."""
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        current = log.stat().st_size if log.exists() else 0
        if current != size:
            size = current
            # Complete lines only: the running process may be half-way through
            # appending one (a loaded machine showed it, under pytest-xdist).
            if current and log.read_bytes().count(b"\n") >= count:
                return True
        time.sleep(0.001)
    raise AssertionError(f"no {count}th request within {timeout} s")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> bool:
    """Send SIG; True if it reached a running process."""
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return True


def continue_command(stderr: str) -> list[str]:
    """The command a stopped run printed for continuing it, as argv for this Python."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        at = line.lower().find("continue with:")
        if at >= 0:
            rest = line[at + len("continue with:") :].strip() or lines[i + 1].strip()
            argv = shlex.split(rest)
            assert argv[0] == "treesynth", rest
            return argv[1:]
    raise AssertionError(f"no continue command in: {stderr}")


# -- reading a store without changing it -----------------------------------


def connect_ro(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True)


def sessions(store: Path) -> list[dict]:
    """Each session's settings (threads, parallel, argv...), oldest first."""
    conn = connect_ro(store)
    try:
        return [json.loads(row[0]) for row in conn.execute("SELECT settings FROM sessions ORDER BY id")]
    finally:
        conn.close()


def stored_requests(store: Path) -> set[str]:
    if not store.exists():
        return set()
    conn = connect_ro(store)
    try:
        return {row[0] for row in conn.execute("SELECT request FROM calls")}
    finally:
        conn.close()


def lost_in_flight(sent: list[str], stored: set[str]) -> list[str]:
    """The requests a stopped run sent but did not store. Only the batch in
    flight can be lost: they must be the last ones sent, at most one batch
    (engine/calls.py: BATCH_PER_SEQUENCE per sequence; the fake model decodes one)."""
    from treesynth.engine.calls import BATCH_PER_SEQUENCE

    unstored = [r for r in sent if r not in stored]
    assert unstored == sent[len(sent) - len(unstored) :], "a request before the last batch was not stored"
    assert len(unstored) <= BATCH_PER_SEQUENCE, f"{len(unstored)} requests lost, more than one batch"
    return unstored


def calls_table(store: Path) -> list[tuple]:
    conn = connect_ro(store)
    try:
        return conn.execute("SELECT key, node, role, step, attempt, request, response FROM calls ORDER BY key").fetchall()
    finally:
        conn.close()


def consistency_problems(store: Path, every_leaf_call_succeeds: bool = True) -> list[str]:
    """What a store left by a killed process must never show: SQLite damage, a
    split node without all its children (or children without a split parent),
    samples or dropped samples of leaf requests not marked done, a request
    marked done without its one sample (kept or dropped), a leaf whose kept
    count is not its samples, more samples than its target or requests past
    its limit, or a leaf whose state disagrees with its progress."""
    conn = connect_ro(store)
    try:
        problems = [f"integrity: {r[0]}" for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
        nodes = {
            row[0]: row
            for row in conn.execute(
                "SELECT key, parent, state, value_list, infinite, target, kept, calls_done, request_limit FROM nodes"
            )
        }
        children: dict[str, int] = {}
        for key, parent, *_ in nodes.values():
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
                if parent not in nodes or nodes[parent][2] != "split":
                    problems.append(f"node {key} has no split parent")
        rows: dict[str, dict[int, list[str]]] = {}
        for table in ("samples", "dropped"):
            for leaf, call in conn.execute(f"SELECT leaf, call FROM {table}"):
                rows.setdefault(leaf, {}).setdefault(call, []).append(table)
        for key, _, state, value_list, infinite, target, kept, calls_done, limit in nodes.values():
            if state == "split":
                expected = 1 if infinite else len(json.loads(value_list))
                if children.get(key, 0) != expected:
                    problems.append(f"split node {key} has {children.get(key, 0)} children, not {expected}")
            elif key in children:
                problems.append(f"node {key} in state {state} has children")
            if state in ("planned", "done"):
                done, by_call = calls_done or 0, rows.pop(key, {})
                stored = sum(tables.count("samples") for tables in by_call.values())
                if stored != (kept or 0):
                    problems.append(f"leaf {key}: kept {kept} but holds {stored} samples")
                if stored > target or done > limit:
                    problems.append(f"leaf {key}: {stored}/{target} samples, {done}/{limit} requests")
                if (state == "done") != (stored >= target or done >= limit):
                    problems.append(f"leaf {key}: state {state} with {stored}/{target} samples, {done}/{limit} requests")
                for call, tables in by_call.items():
                    if call >= done:
                        problems.append(f"leaf {key}: samples of request {call}, which is not marked done")
                if every_leaf_call_succeeds:
                    missing = [call for call in range(done) if len(by_call.get(call, [])) != 1]
                    if missing:
                        problems.append(f"leaf {key}: requests {missing[:5]} do not hold exactly one sample")
        problems += [f"samples of {leaf} outside any planned leaf" for leaf in rows]
        return problems
    finally:
        conn.close()


def export_bytes(store: Path, out: Path) -> bytes:
    result = treesynth_in_process("export", str(store), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def file_state(path: Path) -> dict[str, bytes | None]:
    """The bytes of a store and its WAL, to show nothing changed. An empty WAL
    is the same as none (a read-only SQLite connection to a WAL-mode file
    creates one). The -shm file is left out: it is SQLite's shared-memory
    index of the WAL, where every reader records where it reads, rebuilt from
    the WAL when lost."""
    wal = Path(str(path) + "-wal")
    return {"": path.read_bytes(), "-wal": (wal.read_bytes() or None) if wal.exists() else None}


def without_permission_override():
    """A ``preexec_fn`` that makes file permissions apply to the child.

    Root ignores permission bits through CAP_DAC_OVERRIDE (and
    CAP_DAC_READ_SEARCH); dropping both from the bounding set before exec
    leaves the child root but bound by permissions like any user, so a test
    of an unwritable store means the same when CI runs as root. For any other
    user permissions already apply and nothing is done."""
    if os.geteuid() != 0:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

    def drop() -> None:
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


OFFLINE = Path(__file__).parent / "offline"


def offline_env(network_log: Path) -> dict[str, str]:
    """The environment of a process cut off the network (tests/offline/sitecustomize.py):
    every attempt raises and is logged in NETWORK_LOG."""
    path = os.pathsep.join(p for p in (str(OFFLINE), os.environ.get("PYTHONPATH", "")) if p)
    return env_with(PYTHONPATH=path, TREESYNTH_TEST_NETWORK_LOG=str(network_log))
