"""The resume contract around the crash tests, on the fake model:
deterministic reruns, refused config changes, --restart, one writer, Ctrl-C,
a full disk, an unwritable store, damaged files and `treesynth verify`. Real
`treesynth` processes wherever a signal, a resource limit, a permission or a
second writer is involved; the other commands run in this process. Every
interruption ends in a continued run whose export is byte-identical to an
uninterrupted one."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers_proc import (
    lost_in_flight,
    FAKE_TASK,
    TREESYNTH,
    calls_table,
    consistency_problems,
    continue_command,
    env_with,
    export_bytes,
    file_state,
    kill,
    log_lines,
    sessions,
    start,
    stored_requests,
    treesynth as treesynth_process,
    treesynth_in_process as treesynth,
    wait_for_lines,
    without_permission_override,
)

# FAKE_TASK at depth 2: 42 calls instead of 146 and 1.6 s a run instead of
# 3.4 s. These tests run it about a dozen times; the kill series in
# tests/test_crash.py keep the depth-3 tree.
SMALLER = {"depth": "2", "samples": "24"}
CALLS = 42  # model calls of the task


def task(**changes: str) -> list[str]:
    """FAKE_TASK, at SMALLER, with some flags given other values."""
    args = list(FAKE_TASK)
    for flag, value in {**SMALLER, **changes}.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def run_args(store: Path, model: str = "fake:", **changes: str) -> list[str]:
    return ["run", *task(**changes), "--store", str(store), "--model", model]


def one_line_error(result: subprocess.CompletedProcess | str, code: int = 2) -> str:
    stderr = result if isinstance(result, str) else result.stderr
    if not isinstance(result, str):
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def partial_store(tmp: Path, commits: int = 15, log: Path | None = None) -> Path:
    """A store left by a run SIGKILLed inside its COMMITS-th transaction."""
    store = tmp / "run.db"
    model = f"fake:log={log}" if log else "fake:"
    result = treesynth_process(*run_args(store, model), env=env_with(TREESYNTH_TEST_KILL_IN_COMMIT=str(commits)))
    assert result.returncode == -signal.SIGKILL, result.stderr
    return store


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    store, log = tmp / "ref.db", tmp / "ref.log"
    result = treesynth(*run_args(store, f"fake:log={log}"))
    assert result.returncode == 0, result.stderr
    assert len(log_lines(log)) == CALLS
    return {"store": store, "export": export_bytes(store, tmp / "ref.jsonl"), "log": log_lines(log), "calls": calls_table(store)}


def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tmp_path, reference):
    again = tmp_path / "again.db"
    assert treesynth(*run_args(again)).returncode == 0
    assert export_bytes(again, tmp_path / "again.jsonl") == reference["export"]
    assert calls_table(again) == reference["calls"]
    other = tmp_path / "other.db"
    assert treesynth(*run_args(other, seed="2")).returncode == 0
    other_bytes = export_bytes(other, tmp_path / "other.jsonl")
    assert other_bytes and other_bytes != reference["export"]
    assert not {row[0] for row in calls_table(other)} & {row[0] for row in reference["calls"]}


def test_changed_content_settings_are_refused_naming_the_keys(tmp_path, reference):
    store = partial_store(tmp_path)
    before = file_state(store)
    line = one_line_error(treesynth(*run_args(store, pivots="6", temperature_leaf="0.3")))
    assert "(pivots, temperature.leaf)" in line and "--restart" in line
    line = one_line_error(treesynth(*run_args(store, "fake:variant=1")))
    assert "(model.variant)" in line
    assert file_state(store) == before
    # Threads, progress display, and the fake model's delay and log change nothing in the content.
    result = treesynth(*run_args(store, "fake:delay=0.001"), "--threads", "3", "--progress")
    assert result.returncode == 0, result.stderr
    assert export_bytes(store, tmp_path / "out.jsonl") == reference["export"]
    assert sessions(store)[-1]["threads"] == 3


def test_restart_asks_first_and_yes_skips_the_question(tmp_path):
    # A small tree: this test runs the task four times and compares with no reference.
    small = {"depth": "1", "samples": "6"}
    store = tmp_path / "run.db"
    assert treesynth(*run_args(store, **small)).returncode == 0
    before = file_state(store)
    result = treesynth(*run_args(store, **small), "--restart", input="n\n")
    assert "Delete" in result.stderr and "not restarted" in one_line_error(result)
    assert file_state(store) == before
    result = treesynth(*run_args(store, pivots="4", **small), "--restart", input="y\n")
    assert result.returncode == 0, result.stderr
    config = json.loads(sqlite3.connect(store).execute("SELECT config FROM runs").fetchone()[0])
    assert config["pivots"] == 4 and len(sessions(store)) == 1
    result = treesynth(*run_args(store, **small), "--restart", "--yes")
    assert result.returncode == 0 and "Delete" not in result.stderr
    assert len(sessions(store)) == 1
    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"not a store\n" * 50)
    assert "not a treesynth store" in one_line_error(treesynth(*run_args(foreign, **small), "--restart", "--yes"))
    assert foreign.read_bytes() == b"not a store\n" * 50


def test_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(tmp_path, reference):
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    first = start(run_args(store, f"fake:delay=0.2,log={log}"), tmp_path / "first.txt")
    try:
        assert wait_for_lines(first, log, 2)
        line = one_line_error(treesynth(*run_args(store)))
        assert "being written by another treesynth process" in line and f"pid {first.pid}" in line
        assert "another treesynth process" in one_line_error(treesynth(*run_args(store), "--restart", "--yes"))
        # Readers are not blocked by the writer.
        assert treesynth("status", str(store)).returncode == 0
        assert treesynth("export", str(store)).returncode == 0
        assert first.poll() is None
    finally:
        assert kill(first)
    result = treesynth(*run_args(store))
    assert result.returncode == 0, result.stderr
    assert export_bytes(store, tmp_path / "out.jsonl") == reference["export"]


def test_ctrl_c_stops_cleanly_and_prints_the_command_that_continues(tmp_path, reference):
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    # --restart --yes on the first command: the printed command must not repeat them.
    args = run_args(store, f"fake:delay=0.02,log={log}") + ["--restart", "--yes"]
    stored_before: set[str] = set()
    for i, new_requests in enumerate((1, 10, 20)):
        before = len(log_lines(log))
        out = tmp_path / f"out{i}.txt"
        proc = start(args, out)
        assert wait_for_lines(proc, log, before + new_requests)
        time.sleep(0.01)
        assert kill(proc, signal.SIGINT)
        text = out.read_text()
        assert proc.returncode == 130, text
        assert "interrupted; the store is consistent. Continue with:" in text and "Traceback" not in text
        args = continue_command(text)
        assert "--restart" not in args and "--yes" not in args and args[0] == "run"
        assert consistency_problems(store) == []
        sent, stored = log_lines(log)[before:], stored_requests(store)
        assert not set(sent) & stored_before
        lost_in_flight(sent, stored)
        stored_before = stored
    result = treesynth(*args)
    assert result.returncode == 0, result.stderr
    assert export_bytes(store, tmp_path / "out.jsonl") == reference["export"]
    assert list(dict.fromkeys(log_lines(log))) == reference["log"]


def test_disk_full_mid_run_stops_with_a_message_and_the_next_run_continues_exactly(tmp_path, reference):
    """A real write failure: the child may not grow any file past 256 KiB
    (RLIMIT_FSIZE, what a full disk or quota looks like to SQLite: a failed
    write in the middle of a commit); the store's WAL reaches it first."""
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    limit = 256 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = run_args(store, f"fake:log={log}")
    result = subprocess.run(TREESYNTH + args, preexec_fn=small_disk, capture_output=True, text=True, timeout=300)
    line = one_line_error(result, code=1)
    assert f"cannot write to the store {store}" in line and "nothing committed was lost" in line
    assert continue_command(result.stderr)[:2] == ["run", FAKE_TASK[0]]
    assert consistency_problems(store) == []
    sent, stored = log_lines(log), stored_requests(store)
    assert 0 < len(stored) < CALLS
    lost_in_flight(sent, stored)
    result = treesynth(*args)
    assert result.returncode == 0, result.stderr
    assert not set(log_lines(log)[len(sent) :]) & stored
    assert export_bytes(store, tmp_path / "out.jsonl") == reference["export"]


def test_unwritable_store_is_refused_untouched_and_continues_once_writable(tmp_path, reference):
    store = partial_store(tmp_path)
    sides = [p for p in (Path(f"{store}-wal"), Path(f"{store}-shm")) if p.exists()]
    before = file_state(store)
    for path in (store, *sides):
        path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        result = subprocess.run(
            TREESYNTH + run_args(store), preexec_fn=without_permission_override(), capture_output=True, text=True, timeout=300
        )
        line = one_line_error(result)
        assert f"cannot continue the run in {store}" in line and "not writable" in line and "untouched" in line
        result = subprocess.run(
            TREESYNTH + run_args(tmp_path / "new.db"), preexec_fn=without_permission_override(), capture_output=True, text=True, timeout=300
        )
        assert "cannot create store" in one_line_error(result) and not (tmp_path / "new.db").exists()
    finally:
        tmp_path.chmod(0o755)
        for path in (store, *sides):
            path.chmod(0o644)
    assert file_state(store) == before
    result = treesynth(*run_args(store))
    assert result.returncode == 0, result.stderr
    assert export_bytes(store, tmp_path / "out.jsonl") == reference["export"]


def test_truncated_store_is_refused_and_never_modified(tmp_path, reference):
    whole = reference["store"].read_bytes()
    for size, needle in ((len(whole) * 3 // 5 // 4096 * 4096, "cut short"), (len(whole) - 1000, "whole number"), (60, "shorter than")):
        broken = tmp_path / f"cut{size}.db"
        broken.write_bytes(whole[:size])
        readers = [["status", str(broken)], ["export", str(broken)], ["verify", str(broken)]] if needle == "cut short" else []
        for command in (run_args(broken), *readers):
            line = one_line_error(treesynth(*command))
            assert "is damaged" in line and needle in line and "untouched" in line, line
        assert broken.read_bytes() == whole[:size]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(broken.name)) == [broken.name]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(reference["export"])
    assert "not a treesynth store" in one_line_error(treesynth(*run_args(jsonl)))
    assert jsonl.read_bytes() == reference["export"]


def test_verify_recomputes_every_hash_and_reports_mismatches(tmp_path, reference):
    store = tmp_path / "copy.db"
    shutil.copyfile(reference["store"], store)
    result = treesynth("verify", str(store))
    assert result.returncode == 0 and result.stdout.startswith("ok: ") and f"{CALLS} calls" in result.stdout
    conn = sqlite3.connect(store)
    leaf, call, idx, data = conn.execute("SELECT leaf, call, idx, data FROM samples ORDER BY position, call, idx LIMIT 1").fetchone()
    tampered = json.dumps({name: "tampered" for name in json.loads(data)})
    conn.execute("UPDATE samples SET data = ? WHERE leaf = ? AND call = ? AND idx = ?", [tampered, leaf, call, idx])
    (call_key,) = conn.execute("SELECT key FROM calls ORDER BY key LIMIT 1").fetchone()
    conn.execute("UPDATE calls SET request = replace(request, '\"seed\":', '\"seed\":1') WHERE key = ?", [call_key])
    conn.commit()
    conn.close()
    before = file_state(store)
    result = treesynth("verify", str(store))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"call {call_key}: key does not match the stored request and model",
        f"sample {leaf}/{call}/{idx}: hash mismatch",
        f"2 problems found in {store}",
    ]
    assert file_state(store) == before
