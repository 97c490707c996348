"""`treesynth report`: one self-contained HTML page about a store, checked as
text and in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import embedder, make_store
from helpers_proc import treesynth_in_process
from treesynth.engine.config import TaskConfig
from treesynth.engine.diversity import cosine_near_duplicate_flags, mean_pairwise_cosine
from treesynth.engine.report import report_html
from treesynth.engine.tree import TreeSynth
from treesynth.models.fake import FakeModel
from treesynth.store import Store
from treesynth.store.keys import canonical_json

LEAF_STATES = ("leaf", "planned", "done")
# Model output that tries to be markup, to run script and to fetch from elsewhere.
HOSTILE = (
    '<script>alert(1)</script> <img src="https://evil.example/x.png"> see http://evil.example/a, '
    'url(//evil.example/b) and @import "//evil.example/c.css"'
)
HOSTILE_REASON = "no usable criterion in 8 attempts; last: value '<b>bold</b>' only repeats the task"
EXTERNAL = re.compile(r"https?://|wss?://|(?:src|href|action)\s*=\s*[\"']?\s*//|@import|url\(", re.IGNORECASE)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fake-model run interrupted in its first session and finished in a
    resumed one; one kept sample replaced by hostile model output, one leaf
    given an early-leaf reason with markup in it."""
    path = tmp_path_factory.mktemp("report") / "run.db"
    config = TaskConfig(description="short notes about birds", depth=2, pivots=3, leaf_samples=2, max_values=3)
    db = make_store(path, config, FakeModel())
    first = db.begin_session({"argv": ["run"]}, False)
    events = TreeSynth(config, FakeModel(), db, embedder(), first).run()
    for n, _ in enumerate(events):
        if n == 12:
            break
    events.close()  # the first session stops between two committed steps
    second = db.begin_session({"argv": ["run"]}, True)
    list(TreeSynth(config, FakeModel(), db, embedder(), second).run())
    with db.transaction():
        leaf, call, idx = db.db.execute("SELECT leaf, call, idx FROM samples ORDER BY position, call, idx LIMIT 1").fetchone()
        db.db.execute(
            "UPDATE samples SET data = ? WHERE leaf = ? AND call = ? AND idx = ?",
            [canonical_json({"text": HOSTILE}), leaf, call, idx],
        )
        db.db.execute("UPDATE nodes SET reason = ? WHERE key = ?", [HOSTILE_REASON, leaf])
    yield db
    db.close()


@pytest.fixture(scope="module")
def page(store) -> str:
    return report_html(store)


def expected_label(path: list) -> str:
    if not path:
        return "(root)"
    dimension, value = path[-1]
    return f"{dimension} ∈ {{{len(value)} values}}" if isinstance(value, list) else f"{dimension} = {value}"


def expected_nodes(store: Store) -> list[tuple[str, str, str | None]]:
    """(key, label, leaf counts text or None) of every node, straight from the tables."""
    out = []
    for key, path, state, target in store.db.execute("SELECT key, path, state, target FROM nodes ORDER BY position").fetchall():
        counts = None
        if state in LEAF_STATES:
            kept = store.db.execute("SELECT count(*) FROM samples WHERE leaf = ?", [key]).fetchone()[0]
            dropped = store.db.execute("SELECT count(*) FROM dropped WHERE leaf = ?", [key]).fetchone()[0]
            counts = f"{kept}/{target} kept, {dropped} dropped"
        out.append((key, expected_label(json.loads(path)), counts))
    return out


# -- the page as text ------------------------------------------------------------------------


def test_every_node_its_label_and_each_leafs_counts_appear(store, page):
    nodes = expected_nodes(store)
    leaves = [n for n in nodes if n[2] is not None]
    assert len(nodes) > len(leaves) >= 3  # splits and several leaves: the loop below checks both kinds
    assert any(counts.endswith(", 0 dropped") for _, _, counts in leaves)
    assert any(not counts.endswith(", 0 dropped") for _, _, counts in leaves)
    for key, label, counts in nodes:
        assert html.escape(key) in page
        assert f'<span class="label">{html.escape(label)}</span>' in page, label
        if counts is not None:
            assert f'<span class="counts">{counts}</span>' in page, (label, counts)
    assert "became a leaf early: " + html.escape(HOSTILE_REASON) in page


def test_model_text_is_escaped_and_no_script_is_in_the_page(page):
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    # Shown as written, once the character references are read back.
    assert html.unescape(HOSTILE) in html.unescape(page)


def test_nothing_external_is_named_anywhere(page):
    assert EXTERNAL.search(HOSTILE)  # the pattern does catch what the hostile sample carries
    assert EXTERNAL.search(page) is None, EXTERNAL.search(page)
    assert "xmlns" not in page  # even the SVG namespace is a URL; inline SVG needs none


def test_the_same_store_gives_the_same_bytes(store, page):
    assert report_html(store) == page


def test_header_calls_per_role_and_per_session(store, page):
    assert "short notes about birds" in page and "<th>finished</th>" in page and "seed" in page
    assert '<span class="badge yes">yes</span>' in page
    roles = store.db.execute("SELECT role, count(*), sum(completion_tokens) FROM calls GROUP BY role").fetchall()
    assert {r for r, _, _ in roles} == {"pivots", "criterion", "coverage", "leaf"}
    for role, calls, tokens in roles:
        assert f'<tr><td>{role}</td><td class="n">{calls:,}</td><td class="n">{tokens:,}</td>' in page
    per_session = store.db.execute("SELECT session, count(*) FROM calls GROUP BY session ORDER BY session").fetchall()
    assert [s for s, _ in per_session] == [1, 2] and all(n > 0 for _, n in per_session)
    assert re.search(rf'<tr><td>1</td><td>[^<]+</td><td>run</td><td>new</td><td class="n">{per_session[0][1]:,}</td>', page)
    assert re.search(rf'<tr><td>2</td><td>[^<]+</td><td>run</td><td>resumed</td><td class="n">{per_session[1][1]:,}</td>', page)


def test_dropped_by_reason_and_the_leaf_size_chart(store, page):
    reasons = store.dropped_reasons()
    assert reasons
    for why, n in reasons.items():
        assert f'<tr><td>{html.escape(why)}</td><td class="n">{n:,}</td></tr>' in page
    leaves = store.db.execute("SELECT count(*) FROM nodes WHERE state IN ('leaf', 'planned', 'done')").fetchone()[0]
    bars = [int(n) for n in re.findall(r"<title>(\d+) leaves with \d+ kept samples</title>", page)]
    assert bars and sum(bars) == leaves


def test_diversity_comes_from_the_stored_vectors(store, page):
    rows = store.db.execute("SELECT vector FROM samples ORDER BY position, call, idx").fetchall()
    vectors = np.stack([np.frombuffer(v, dtype=np.float32) for (v,) in rows]).astype(np.float64)
    cosine = mean_pairwise_cosine(vectors)
    near = sum(cosine_near_duplicate_flags(vectors)) / len(vectors)
    assert f'(lower = more diverse)</td><td class="n">{cosine:.3f}</td>' in page
    assert f'to an earlier sample)</td><td class="n">{100 * near:.1f} %</td>' in page
    assert f"Over all {len(rows)} kept samples" in page


def report_of_copy(store: Store, path: Path, sql: str) -> str:
    """The report of a copy of the store changed by SQL (the store itself stays as it is)."""
    target = sqlite3.connect(path)
    store.db.conn.backup(target)
    target.execute(sql)
    target.commit()
    target.close()
    copy = Store.open_existing(path)
    try:
        return report_html(copy)
    finally:
        copy.close()


def test_a_store_without_vectors_says_not_computed(store, tmp_path):
    page = report_of_copy(store, tmp_path / "old.db", "UPDATE samples SET vector = NULL")
    assert "<b>not computed</b> (the store holds no sample embeddings" in page
    assert "lower = more diverse" not in page


def test_diversity_is_over_the_samples_that_have_a_vector(store, tmp_path):
    page = report_of_copy(store, tmp_path / "part.db", "UPDATE samples SET vector = NULL WHERE call = 0")
    rows = store.db.execute("SELECT vector FROM samples WHERE call != 0 ORDER BY position, call, idx").fetchall()
    missing = store.db.execute("SELECT count(*) FROM samples WHERE call = 0").fetchone()[0]
    assert len(rows) >= 2 and missing >= 1
    vectors = np.stack([np.frombuffer(v, dtype=np.float32) for (v,) in rows]).astype(np.float64)
    assert f'(lower = more diverse)</td><td class="n">{mean_pairwise_cosine(vectors):.3f}</td>' in page
    assert f"Over all {len(rows)} kept samples" in page and f"; {missing} samples have no stored embedding" in page


# -- the command ---------------------------------------------------------------------------------


def treesynth(*args, cwd=None):
    return treesynth_in_process(*args, cwd=cwd)


def test_cli_writes_the_page_atomically_and_the_same_bytes_twice(store, page, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("an older report")
    first = treesynth("report", store.path, "-o", out)
    assert first.returncode == 0, first.stderr
    written = out.read_bytes()
    assert written == page.encode("utf-8")
    second = treesynth("report", store.path, "--output", out)
    assert second.returncode == 0, second.stderr
    assert out.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left behind


@pytest.mark.parametrize("case", ["no store", "not a store", "no output directory", "output is a directory"])
def test_bad_input_is_one_error_line_and_exit_code_2(store, tmp_path, case):
    (tmp_path / "notes.txt").write_text("not a store")
    args = {
        "no store": [tmp_path / "missing.db", "-o", tmp_path / "r.html"],
        "not a store": [tmp_path / "notes.txt", "-o", tmp_path / "r.html"],
        "no output directory": [store.path, "-o", tmp_path / "nowhere" / "r.html"],
        "output is a directory": [store.path, "-o", tmp_path],
    }[case]
    result = treesynth("report", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.html").exists()


# -- a real browser --------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must install it (see .ci/run: apt-get install chromium)")
    pytest.skip("chromium not found; the report's browser tests need it: install it with: apt-get install chromium")


def run_chromium(url: str, tmp: Path, *extra: str) -> str:
    """Headless chromium on URL with a fresh profile and no background
    networking; its stdout. Killed, with its children, after 60 s."""
    args = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", *extra, url,
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within 60 s on {url}")
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode("utf-8")


def page_requests(net_log: Path) -> list[str]:
    """Network requests the PAGE started (http, https, ws, wss), from a
    chromium net log. Chromium's own background requests (its clock, its
    accounts) carry the initiator "not an origin"; a file:// page's carry its
    opaque origin, "null"."""
    text = net_log.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut short has no closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    kinds = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        url = params.get("url", "")
        if kinds.get(event["type"]) == "URL_REQUEST_START_JOB" and re.match(r"(https?|wss?)://", url):
            if params.get("initiator") != "not an origin":
                urls.append(url)
    return urls


@pytest.fixture
def page_file(page, tmp_path) -> Path:
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def test_the_net_log_check_sees_a_page_that_fetches(tmp_path):
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><p>x</p><img src="http://127.0.0.1:9/x.png">', encoding="utf-8")
    run_chromium(control.as_uri(), tmp_path, f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom")
    assert page_requests(tmp_path / "net.json") == ["http://127.0.0.1:9/x.png"]


def test_the_browser_renders_the_tree_and_counts_without_any_request(store, page_file, tmp_path):
    dom = run_chromium(page_file.as_uri(), tmp_path, f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom")
    assert page_requests(tmp_path / "net.json") == []
    nodes = expected_nodes(store)
    assert any(counts for _, _, counts in nodes)
    for key, label, counts in nodes:
        assert f'<span class="label">{html.escape(label, quote=False)}</span>' in dom, label
        assert key in dom
        if counts is not None:
            assert f'<span class="counts">{counts}</span>' in dom, (label, counts)
    # The hostile sample is text in the DOM, not an element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom.lower()
    assert "https://evil.example/x.png" in dom and "<img" not in dom.lower()
    assert 'id="diversity"' in dom and "<svg" in dom


def test_the_browser_takes_a_screenshot(page_file, tmp_path):
    shot = tmp_path / "report.png"
    run_chromium(page_file.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 1600)
    assert len(data) > 30_000  # a blank page compresses to a few KB; this one has text and a chart


def test_an_unfinished_run_says_so_and_shows_its_pending_nodes(tmp_path):
    config = TaskConfig(description="short notes about birds", depth=2, pivots=3, leaf_samples=2, max_values=3)
    db = make_store(tmp_path / "part.db", config, FakeModel())
    events = TreeSynth(config, FakeModel(), db, embedder(), db.begin_session({}, False)).run()
    for n, _ in enumerate(events):
        if n == 12:
            break
    events.close()
    try:
        page = report_html(db)
        states = dict(db.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall())
    finally:
        db.close()
    assert '<span class="badge no">no</span>' in page
    pending = [s for s in states if s not in ("split", "done")]
    assert pending
    for state in pending:
        assert f'<span class="badge s-{state}">{state}</span>' in page
