"""Bad input from a user: one clear line on stderr, exit code 2, no traceback, no store touched.

In process (typer's runner, where an exception that escapes ends with exit
code 1, not 2) unless llama.cpp itself runs: its C-level messages reach
stderr only in a real process, so those cases start `python -m treesynth`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers_proc import TREESYNTH
from helpers_proc import treesynth as treesynth_process  # a real process: llama.cpp's own messages go to its stderr
from helpers_proc import treesynth_in_process as treesynth

DESC = "GSM8K-style grade-school math word problems"


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["   "], ["description", "empty"]),
        ([DESC, "--depth", "-1"], ["depth"]),
        ([DESC, "--depth", "99"], ["depth", "less than or equal to 8"]),
        ([DESC, "--pivots", "1"], ["pivots", "greater than or equal to 2"]),
        ([], ["description or --spec"]),
    ],
)
def test_bad_parameters(tmp_path, args, needles):
    store = tmp_path / "s.db"
    result = treesynth("run", *args, "--store", str(store), "--model", "fake:")
    assert_user_error(result, *needles)
    assert not store.exists()


def test_parallel_below_one_or_with_a_server_is_one_line(tmp_path):
    store = tmp_path / "s.db"
    assert_user_error(treesynth("run", DESC, "--store", str(store), "--model", "fake:", "--parallel", "0"), "--parallel must be at least 1")
    result = treesynth("run", DESC, "--store", str(store), "--server", "http://127.0.0.1:9", "--parallel", "2")
    assert_user_error(result, "--parallel and --gpu-layers are for a local model")
    assert not store.exists()


def test_parallel_too_large_for_memory_names_the_limit(tmp_path):
    # 200 sequences of 32768 tokens: about 141 GiB of KV cache for the embedded model.
    result = treesynth_process("run", DESC, "--store", str(tmp_path / "s.db"), "--parallel", "200", "--n-ctx", "32768")
    assert_user_error(result, "--parallel 200 with --n-ctx 32768 needs", "of KV cache", "the limit is", "lower --parallel or --n-ctx")


def test_model_path_that_does_not_exist(tmp_path):
    result = treesynth("run", DESC, "--store", str(tmp_path / "s.db"), "--model", str(tmp_path / "nope.gguf"))
    assert_user_error(result, "model file not found")


def test_model_that_is_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is not a model")
    result = treesynth("run", DESC, "--store", str(tmp_path / "s.db"), "--model", str(bogus))
    assert_user_error(result, "not a GGUF model file")


def test_gguf_that_cannot_be_loaded(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    result = treesynth_process("run", DESC, "--store", str(tmp_path / "s.db"), "--model", str(broken))
    assert_user_error(result, "cannot load model")
    assert not (tmp_path / "s.db").exists()


def test_store_that_is_not_a_treesynth_store_is_left_untouched(tmp_path):
    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"my precious notes\n" * 100)
    before = foreign.read_bytes()
    result = treesynth("run", DESC, "--store", str(foreign), "--model", "fake:")
    assert_user_error(result, "not a treesynth store", "untouched")
    assert foreign.read_bytes() == before

    import sqlite3

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    result = treesynth("run", DESC, "--store", str(other), "--model", "fake:")
    assert_user_error(result, "not a treesynth store")
    assert other.read_bytes() == before


def test_unwritable_store_location(tmp_path):
    result = treesynth("run", DESC, "--store", str(tmp_path / "missing" / "s.db"), "--model", "fake:")
    assert_user_error(result, "does not exist")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores directory permissions
            result = treesynth("run", DESC, "--store", "/proc/s.db", "--model", "fake:")
        else:
            result = treesynth("run", DESC, "--store", str(locked / "s.db"), "--model", "fake:")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "cannot create store" in result.stderr
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "toml, needles",
    [
        ('description = "x"\ndepth = "deep"\n', ["depth", "integer"]),
        ('description = "x"\npivtos = 3\n', ["pivtos", "not permitted"]),
        ('description = "x"\n[temperature]\nleaf = 9.0\n', ["temperature.leaf"]),
        ("description = \n", ["not valid TOML"]),
        ('description = "x"\nsample_schema = "{not json"\n', ["sample_schema", "not valid JSON"]),
    ],
)
def test_invalid_task_file_names_the_key_and_why(tmp_path, toml, needles):
    spec = tmp_path / "task.toml"
    spec.write_text(toml)
    result = treesynth("run", "--spec", str(spec), "--store", str(tmp_path / "s.db"), "--model", "fake:")
    assert_user_error(result, str(spec), *needles)


def test_missing_task_file(tmp_path):
    result = treesynth("run", "--spec", str(tmp_path / "none.toml"), "--store", str(tmp_path / "s.db"), "--model", "fake:")
    assert_user_error(result, "task file not found")


def test_existing_store_with_different_content_config_names_the_keys(tmp_path):
    store = tmp_path / "s.db"
    first = treesynth("run", DESC, "--store", str(store), "--model", "fake:", "--depth", "1", "--pivots", "3")
    assert first.returncode == 0, first.stderr
    before = store.read_bytes()
    result = treesynth("run", DESC, "--store", str(store), "--model", "fake:", "--depth", "2", "--pivots", "4", "--seed", "5")
    assert_user_error(result, "depth", "pivots", "seed")
    assert store.read_bytes() == before


def test_read_commands_on_a_missing_or_foreign_store(tmp_path):
    for command in ("status", "tree", "export", "verify"):
        assert_user_error(treesynth(command, str(tmp_path / "none.db")), "no store at")
    foreign = tmp_path / "f.db"
    foreign.write_text("hello")
    assert_user_error(treesynth("status", str(foreign)), "not a treesynth store")


def _our_frames(stderr: str) -> list[str]:
    """Traceback frames in treesynth's own files (the repo root is the package; not its .venv)."""
    root = Path(__file__).resolve().parent.parent
    frames = [Path(f) for f in re.findall(r'File "([^"]+)"', stderr) if Path(f).is_absolute()]
    return [str(f) for f in frames if f.resolve().is_relative_to(root) and not f.resolve().is_relative_to(root / ".venv")]


def test_ctrl_c_wrapped_by_python_on_its_way_out_is_still_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C that lands while pydantic builds a model class at import
    leaves as "RuntimeError: Error calling __set_name__", caused by the
    KeyboardInterrupt (found by the test below on CI); any other error still
    escapes as itself."""
    import treesynth.engine.cli as cli
    from treesynth.engine import entry

    def interrupted_inside_a_class():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("Error calling __set_name__ on 'PydanticDescriptorProxy'") from interrupt

    monkeypatch.setattr(cli, "main", interrupted_inside_a_class)
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130 and capsys.readouterr().err == "\ninterrupted\n"

    def broken():
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(cli, "main", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        entry.main()


def test_ctrl_c_during_start_up_ends_without_a_traceback(tmp_path):
    import signal
    import time

    # Moments inside the imports and typer's set-up (about 0.35 s here). A signal
    # that lands before any code of ours runs (CPython importing `site`, which
    # ends in its own "Fatal Python error: init_import_site", or runpy and
    # importlib still finding the package, a traceback with no frame of ours)
    # is not ours to handle, and is not counted.
    interrupted = 0
    delays = (0.1, 0.2, 0.3, 0.45, 0.6)
    for i, delay in enumerate(delays):
        store = tmp_path / f"s{i}.db"
        proc = subprocess.Popen(
            TREESYNTH + ["run", DESC, "--store", str(store), "--model", "fake:delay=0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal: nothing to check
            continue
        if proc.returncode == 1 and "init_import_site" in stderr:  # inside CPython's own start
            continue
        if "Traceback" in stderr and not _our_frames(stderr):  # inside runpy/importlib, finding our package
            continue
        # 130 from our handler; -SIGINT where CPython re-raises the signal at exit.
        assert proc.returncode in (130, -signal.SIGINT), (delay, proc.returncode, stderr)
        assert "Traceback" not in stderr, stderr
        interrupted += 1
    # A start-up that always finished before the signal would have checked nothing.
    assert interrupted >= 2, f"only {interrupted} of {len(delays)} runs were interrupted in treesynth's own start-up"


def test_a_model_that_fails_mid_run_ends_in_one_line_for_run_baseline_and_balance(tmp_path):
    """In process (typer's runner): the model raises after a few answered calls;
    each command that writes a store ends in one `error:` line, exit code 2,
    no traceback, and the store continues to the end afterwards."""
    from typer.testing import CliRunner

    from treesynth.engine.cli import app

    def invoke(*args: str):
        return CliRunner().invoke(app, [*args, "--no-progress"])

    def assert_stopped_by_the_model(result, after: int) -> None:
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.stderr
        lines = [line.rstrip() for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == [lines[-1]], result.stderr
        assert f"the fake model failed as asked after {after} calls" in errors[0]
        assert "nothing committed was lost" in errors[0] and "continue with: treesynth" in errors[0]

    store, base, data = tmp_path / "tree.db", tmp_path / "base.db", tmp_path / "data.jsonl"
    shape = ["--depth", "1", "--pivots", "3", "--max-values", "3", "--samples", "6", "--seed", "3"]
    assert_stopped_by_the_model(invoke("run", DESC, "--store", str(store), "--model", "fake:fail=4", *shape), 4)
    finished = invoke("run", DESC, "--store", str(store), "--model", "fake:", *shape)
    assert finished.exit_code == 0, finished.output

    assert_stopped_by_the_model(invoke("baseline", "--like", str(store), "--store", str(base), "--model", "fake:fail=2"), 2)
    assert invoke("baseline", "--like", str(store), "--store", str(base), "--model", "fake:").exit_code == 0

    data.write_text("".join(f'{{"text": "record number {i}"}}\n' for i in range(5)))
    # 8 a leaf from 5 records: routing (where the tree has finite splits), then synthesis calls.
    balanced = ["balance", str(data), "--store", str(store), "--per-leaf", "8", "-o", str(tmp_path / "out.jsonl")]
    assert_stopped_by_the_model(invoke(*balanced, "--model", "fake:fail=0"), 0)
    assert not (tmp_path / "out.jsonl").exists()
    done = invoke(*balanced, "--model", "fake:")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out.jsonl").exists()
