"""Baseline: temperature sampling from the root prompt alone, stored like a
run (export, status, tree, diversity read it), resumable after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

from helpers_proc import TREESYNTH, treesynth_in_process

from treesynth.engine.baseline import baseline_mark, baseline_plan
from treesynth.store import Store


def _cli(*args, cwd):
    """In this process: only the killed baseline below needs a real one."""
    return treesynth_in_process(*args, cwd=cwd)


def _leaf_requests(path) -> list[dict]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never creates the file
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT request FROM calls WHERE role = 'leaf' ORDER BY step")]
    finally:
        conn.close()


def test_plan_is_full_calls_then_the_remainder():
    assert baseline_plan(25, 10) == [10, 10, 5]
    assert baseline_plan(30, 10) == [10, 10, 10]
    assert baseline_plan(1, 10) == [1]


def test_baseline_is_a_run_of_the_root_prompt_alone_with_the_budget(tmp_path):
    result = _cli("baseline", "short poems about the sea", "-n", "25", "--store", "base.db", "--seed", "4", "--model", "fake:", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: baseline of 25 samples in base.db (")
    store = Store.open_existing(tmp_path / "base.db")
    assert baseline_mark(store) == 25
    config = store.run().config
    assert config["depth"] == 0 and config["max_samples"] == config["samples"] == 25
    requests = _leaf_requests(tmp_path / "base.db")
    dropped = store.db.execute("SELECT count(*) FROM dropped").fetchone()[0]
    # One sample per request, like a tree run's leaves; each dropped sample made up by one more request.
    assert len(requests) == 25 + dropped
    for request in requests:
        prompt = request["messages"][1][1]
        assert prompt == "Write one example of the following: short poems about the sea"
        assert request["temperature"] == 0.9 and request["schema"]["type"] == "object"
    assert len(set(r["seed"] for r in requests)) == len(requests)
    exported = _cli("export", "base.db", cwd=tmp_path)
    assert len(exported.stdout.splitlines()) == 25
    assert all(json.loads(line)["attributes"] == {} for line in exported.stdout.splitlines())
    status = _cli("status", "base.db", cwd=tmp_path).stdout
    assert "finished:    yes" in status and "samples:     25 of 25 asked for" in status
    assert "kind:        baseline (temperature sampling from the root prompt, 25 samples)" in status
    tree = _cli("tree", "base.db", cwd=tmp_path).stdout.strip()
    assert tree == "(root)  [leaf: 25/25 samples" + (f", {dropped} dropped]" if dropped else "]")


def test_rerun_sends_nothing_and_a_different_budget_is_refused(tmp_path):
    args = ["baseline", "short poems", "-n", "7", "--store", "base.db"]
    assert _cli(*args, "--model", "fake:", cwd=tmp_path).returncode == 0
    again = _cli(*args, "--model", f"fake:log={tmp_path / 'calls.log'}", cwd=tmp_path)
    assert again.returncode == 0 and "done: baseline of 7 samples in base.db (" in again.stdout
    assert "; 0 model calls sent" in again.stdout
    assert not (tmp_path / "calls.log").exists()  # the fake model logs every request it is sent
    other = _cli("baseline", "short poems", "-n", "8", "--store", "base.db", "--model", "fake:", cwd=tmp_path)
    assert other.returncode == 2 and "max_samples" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_bad_budget_and_a_tree_store_are_refused(tmp_path):
    for n in ("0", "-3"):
        result = _cli("baseline", "poems", "-n", n, "--store", "b.db", "--model", "fake:", cwd=tmp_path)
        assert result.returncode == 2 and "-n must be at least 1" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.db").exists()
    missing = _cli("baseline", "poems", "--store", "b.db", "--model", "fake:", cwd=tmp_path)
    assert missing.returncode == 2 and "give -n" in missing.stderr
    # A tree run whose config happens to equal a baseline's: not continued as a baseline.
    run = _cli("run", "poems", "--depth", "0", "--max-samples", "5", "--samples", "5", "--store", "t.db", "--model", "fake:", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    refused = _cli("baseline", "poems", "-n", "5", "--store", "t.db", "--model", "fake:", cwd=tmp_path)
    assert refused.returncode == 2 and "holds a tree run, not a baseline" in refused.stderr
    assert "kind:        tree run" in _cli("status", "t.db", cwd=tmp_path).stdout


def test_like_copies_the_tree_runs_task_and_budget(tmp_path):
    run = _cli("run", "short notes", "--store", "t.db", "--model", "fake:", "--depth", "1", "--pivots", "3", "--max-values", "3", "--leaf-samples", "2", "--infinite-samples", "1", "--seed", "9", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    tree = Store.open_existing(tmp_path / "t.db")
    budget = tree.counts()["samples"]
    result = _cli("baseline", "--like", "t.db", "--store", "base.db", "--model", "fake:", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    base = Store.open_existing(tmp_path / "base.db")
    config, tree_config = base.run().config, tree.run().config
    assert (config["description"], config["leaf_samples"], config["seed"]) == ("short notes", 2, 9)
    assert config["sample_schema"] == tree_config["sample_schema"] and config["temperature"] == tree_config["temperature"]
    assert base.counts()["samples"] == budget == config["max_samples"]


def test_killed_baseline_resumes_to_the_same_export(tmp_path):
    args = ["baseline", "short poems", "-n", "12", "--seed", "5", "--no-progress"]
    whole = _cli(*args, "--store", "a.db", "--model", "fake:", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    total = len(_leaf_requests(tmp_path / "a.db"))
    log = tmp_path / "calls.log"
    process = subprocess.Popen([*TREESYNTH, *args, "--store", "b.db", "--model", f"fake:delay=0.2,log={log}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(_leaf_requests(tmp_path / "b.db")) >= 4:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    committed = len(_leaf_requests(tmp_path / "b.db"))
    assert 4 <= committed < total
    sent_before = len(log.read_text().splitlines())
    resumed = _cli(*args, "--store", "b.db", "--model", f"fake:log={log}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"; {total - committed} model calls sent" in resumed.stdout  # no committed call sent again
    assert len(log.read_text().splitlines()) - sent_before == total - committed
    a = _cli("export", "a.db", cwd=tmp_path).stdout
    b = _cli("export", "b.db", cwd=tmp_path).stdout
    assert a == b and len(a.splitlines()) == 12


def test_real_model_baseline(tmp_path):
    spec = tmp_path / "task.toml"
    spec.write_text(
        'description = "one-line facts about animals"\n'
        'sample_schema = \'{"type": "object", "properties": {"fact": {"type": "string", "minLength": 10, "maxLength": 80}}, "required": ["fact"]}\'\n',
        encoding="utf-8",
    )
    result = _cli("baseline", "--spec", "task.toml", "-n", "3", "--max-tokens", "200", "--store", "base.db", "--threads", "1", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    requests = _leaf_requests(tmp_path / "base.db")
    assert len(requests) >= 3 and all(r["schema"]["properties"]["fact"]["maxLength"] == 80 for r in requests)
    lines = _cli("export", "base.db", cwd=tmp_path).stdout.splitlines()
    assert 1 <= len(lines) <= 3  # dropped samples are made up within the request limit, else counted short
    for line in lines:
        record = json.loads(line)
        assert 10 <= len(record["fact"]) <= 80 and record["attributes"] == {}
