"""The OpenAI-compatible server backend against real server processes
(tests/openai_server.py: standard-library HTTP in front of the embedded model),
started once for the module and killed with real signals.

Servers: ``main`` and ``replica`` (the same model, the second one killed and
restarted in the kill test), ``faulty`` (429 then 503 on its first
completions, requires an API key), ``ignorer`` (answers free text, serves two
model ids, another build)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers_proc import TREESYNTH
from helpers_proc import treesynth_in_process as treesynth  # the tests that kill or interrupt the client start real processes

from treesynth.models.base import ModelError, Request
from treesynth.models.server import ServerModel, json_prefix

SERVER_SCRIPT = Path(__file__).with_name("openai_server.py")
# A root that is a leaf: three leaf calls, about a second each on the embedded
# model. The module runs it about eight times: seed 11's three answers take 124
# tokens (57, 29, 38), seed 3's took 264 (139, 59, 66); each answer still
# takes long enough for the kill tests to land while it is in flight.
TASK = ["short math word problems", "--depth", "0", "--samples", "3", "--seed", "11", "--no-progress"]
SECRET = "sk-test-" + uuid.uuid4().hex
SERVER_KEY_ENV = "OPENAI_SERVER_TEST_KEY"  # what the faulty server requires
CLIENT_KEY_ENV = "TREESYNTH_TEST_SERVER_KEY"  # where treesynth reads it from


class ServerProcess:
    def __init__(self, folder: Path, name: str, *args: str, env: dict[str, str] | None = None):
        self.name = name
        self.log = folder / f"{name}.log"
        self.err = folder / f"{name}.err"
        self.args = list(args)
        self.env = env
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port or 0), "--log", str(self.log), *self.args]
        with open(self.err, "ab") as err:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, **(self.env or {})}
            )

    def wait_ready(self, timeout: float = 180) -> None:
        """The port it printed, then a 200 from its /health."""
        deadline = time.monotonic() + timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        assert line.strip(), f"server {self.name} did not start: {self.err.read_text()}"
        self.port = int(line)
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server {self.name} never answered /health"
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.proc.stdout.close()

    def requests(self) -> list[dict]:
        """The completion requests it received, in order (logged before answering)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("servers")
    made = {
        "main": ServerProcess(folder, "main"),
        "replica": ServerProcess(folder, "replica"),
        "faulty": ServerProcess(
            folder, "faulty", "--rate-limit", "1", "--fail-first", "2", "--require-key-env", SERVER_KEY_ENV,
            env={SERVER_KEY_ENV: SECRET},
        ),
        "ignorer": ServerProcess(
            folder, "ignorer", "--ignore-schema", "--model-id", "smollm2-135m", "--model-id", "beta", "--build-info", "other-build"
        ),
    }  # fmt: skip
    try:
        for server in made.values():  # all load the model at once
            server.start()
        for server in made.values():
            server.wait_ready()
        yield made
    finally:
        for server in made.values():
            server.kill()


def export(store: Path) -> bytes:
    out = store.with_suffix(".jsonl")
    result = treesynth("export", str(store), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def error_line(result: subprocess.CompletedProcess | str, *needles: str) -> str:
    """The run stopped with exit 2 and one error line (its last), no traceback."""
    if not isinstance(result, str):
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        result = result.stderr
    assert "Traceback" not in result, result
    lines = [line for line in result.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result
    assert sum(line.startswith("error: ") for line in lines) == 1, result
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def stored_calls(store: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM calls").fetchone()[0]


@pytest.fixture(scope="module")
def reference(servers, tmp_path_factory) -> tuple[Path, bytes, subprocess.CompletedProcess, list[dict]]:
    """An uninterrupted run through the main server: its store, export, result
    and the completion requests the server received from it."""
    store = tmp_path_factory.mktemp("reference") / "run.db"
    before = len(servers["main"].requests())
    result = treesynth("run", *TASK, "--store", str(store), "--server", servers["main"].url)
    assert result.returncode == 0, result.stderr
    return store, export(store), result, servers["main"].requests()[before:]


# -- answers a server could not have made under the schema --------------------------


def test_json_prefix_tells_a_cut_off_answer_from_free_text():
    document = '{"dimension":"topic","labels":["a b",  "c\\u00e9\\n"],"n":-12.5e+3,"ok":true,"none":null}'
    assert all(json_prefix(document[:i]) for i in range(len(document) + 1))
    for text in ("Sure! Here is", 'Here: {"a":1}', '{"a":1}}', '{"a" 1', '{"a":1,}', "[1 2]", '{"a":tru e}', '"\\x"'):
        assert not json_prefix(text), text


def test_a_cut_off_answer_comes_back_cut_off_and_text_patterns_are_refused(servers):
    from treesynth.models.base import TEXT_PATTERN

    main = servers["main"]
    model = ServerModel([main.url])
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 40, "maxLength": 80}}, "required": ["story"]}
    request = Request((("user", "Tell a short story."),), schema, 4, 0.0, 1.0, 7)
    (answer,) = model.generate([request])
    assert answer.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(answer.text)  # the engine rejects it as cut off; it is never a valid answer
    assert json_prefix(answer.text) and answer.text.startswith("{")

    before = len(main.requests())
    with pytest.raises(ModelError, match="text pattern"):
        model.generate([Request((("user", "Count."),), {TEXT_PATTERN: "[0-9]+"}, 8, 0.0, 1.0, 7)])
    assert len(main.requests()) == before  # refused before anything is sent


# -- (a) a run through a server, then the same command again -----------------------------


def test_run_through_a_server_and_rerun_sends_nothing(servers, reference):
    store, exported, result, received = reference
    assert "3 model calls sent" in result.stdout, result.stdout
    lines = exported.decode().splitlines()
    assert len(lines) == 3
    for line in lines:
        record = json.loads(line)
        assert isinstance(record["text"], str) and record["text"].strip()
    verify = treesynth("verify", str(store))
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stdout
    assert len(received) == 3
    # The server says it is llama-server-like (/props): prompt caching off, schema sent.
    assert all(r["cache_prompt"] is False and r["response_format"] == "json_schema" for r in received)
    count = len(servers["main"].requests())
    again = treesynth("run", *TASK, "--store", str(store), "--server", servers["main"].url)
    assert again.returncode == 0, again.stderr
    assert "0 model calls sent" in again.stdout, again.stdout
    assert len(servers["main"].requests()) == count  # nothing reached the server
    assert export(store) == exported


def test_status_tree_baseline_and_balance_work_on_a_server_store(servers, reference, tmp_path):
    """A store made through a server is a store like any other: read by
    status and tree, copied by baseline --like, balanced, all through the server."""
    import sqlite3

    store = tmp_path / "copy.db"  # balance writes its calls into the tree's store: not into the shared reference
    with sqlite3.connect(reference[0]) as source, sqlite3.connect(store) as copy:
        source.backup(copy)
    url = servers["main"].url
    status = treesynth("status", str(store))
    assert status.returncode == 0 and "finished:    yes" in status.stdout, status.stdout + status.stderr
    tree = treesynth("tree", str(store))
    assert tree.returncode == 0 and tree.stdout.startswith("(root)"), tree.stdout + tree.stderr

    base = tmp_path / "base.db"
    baseline = treesynth("baseline", "--like", str(store), "--store", str(base), "--server", url, "--no-progress")
    assert baseline.returncode == 0, baseline.stderr
    assert len(export(base).decode().splitlines()) == 3

    data, out = tmp_path / "data.jsonl", tmp_path / "balanced.jsonl"
    data.write_text('{"text": "Ann has 3 apples and eats one. How many are left?"}\n{"text": "A bus seats 40. How many buses for 90 children?"}\n')
    balanced = treesynth("balance", str(data), "--store", str(store), "--per-leaf", "3", "-o", str(out), "--server", url, "--no-progress")
    assert balanced.returncode == 0, balanced.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and sum(bool(r.get("synthesised")) for r in records) == 1, records


# -- (b) the same seed and settings, a fresh store: the same bytes ------------------------


def test_same_seed_fresh_store_same_export_bytes(servers, reference, tmp_path):
    store = tmp_path / "again.db"
    result = treesynth("run", *TASK, "--store", str(store), "--server", servers["main"].url)
    assert result.returncode == 0, result.stderr
    assert export(store) == reference[1]


# -- (c) 429 and 503 retried; (g) the API key sent, never stored ----------------------------


def test_rate_limits_and_unavailable_are_retried_and_the_key_is_never_stored(servers, reference, tmp_path):
    faulty = servers["faulty"]
    store = tmp_path / "faulty.db"
    no_key = treesynth("run", *TASK, "--store", str(store), "--server", faulty.url)
    error_line(no_key, faulty.url, "401", "--api-key-env")
    assert not store.exists()

    result = treesynth(
        "run", *TASK, "--store", str(store), "--server", faulty.url, "--api-key-env", CLIENT_KEY_ENV, env={CLIENT_KEY_ENV: SECRET}
    )
    assert result.returncode == 0, result.stderr
    received = faulty.requests()
    assert len(received) == 3 + 3  # one 429 and two 503s, then the three calls
    assert all(r["authorization"] == f"Bearer {SECRET}" for r in received)
    assert "3 model calls sent" in result.stdout
    assert export(store) == reference[1]  # retries change nothing in the content
    assert SECRET not in result.stdout + result.stderr
    files = sorted(tmp_path.glob("faulty.db*"))
    assert files and all(SECRET.encode() not in f.read_bytes() for f in files)


# -- (d) a server that ignores the json_schema ------------------------------------------------


def test_a_server_that_ignores_the_schema_stops_the_run_and_nothing_is_stored(servers, tmp_path):
    ignorer = servers["ignorer"]
    store = tmp_path / "ignored.db"
    result = treesynth("run", *TASK, "--store", str(store), "--server", ignorer.url, "--server-model", "beta")
    error_line(result, f"server {ignorer.url} ignored the response_format json_schema", "nothing committed was lost")
    assert stored_calls(store) == 0
    assert len(ignorer.requests()) == 1  # an answer that breaks its schema is not retried


# -- (f) bad input: one line, exit 2, no store -------------------------------------------------


def test_bad_server_input_is_one_line(servers, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    main, ignorer, faulty = servers["main"].url, servers["ignorer"].url, servers["faulty"].url
    cases = {
        "both": (["--server", main, "--model", "fake:"], ["--model", "--server", "not both"]),
        "unreachable": (["--server", closed], [f"cannot reach server {closed}", "connection refused"]),
        "several": (["--server", ignorer], [ignorer, "smollm2-135m, beta", "--server-model"]),
        "no key": (["--server", faulty, "--api-key-env", "TREESYNTH_UNSET_VARIABLE"], ["TREESYNTH_UNSET_VARIABLE", "not set"]),
    }
    env = {**os.environ}
    env.pop("TREESYNTH_UNSET_VARIABLE", None)
    running = {
        name: subprocess.Popen(
            TREESYNTH + ["run", *TASK, "--store", str(tmp_path / f"{i}.db"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i, (name, (args, _)) in enumerate(cases.items())
    }  # fmt: skip
    for i, (name, (_, needles)) in enumerate(cases.items()):
        out, err = running[name].communicate(timeout=120)
        assert running[name].returncode == 2, (name, out, err)
        assert len([line for line in err.splitlines() if line.strip()]) == 1, (name, err)
        error_line(err, *needles)
        assert not (tmp_path / f"{i}.db").exists(), name


@pytest.mark.parametrize(
    "urls, options, needles",
    [
        ([], {"model": "beta"}, ["go with --server"]),
        (["main"], {"model": "gpt-9"}, ["does not serve model 'gpt-9'", "smollm2-135m"]),
        (["main", "ignorer"], {"model": "smollm2-135m"}, ["do not serve the same model", "other-build"]),
        (["main", "main"], {}, ["the same --server URL is given twice"]),
        (["main"], {"parallel": 0}, ["--server-parallel must be at least 1"]),
        (["ftp://example.org"], {}, ["is not an http:// or https:// URL"]),
    ],
)
def test_more_bad_server_options_are_one_line_model_errors(servers, urls, options, needles):
    """The same loader the CLI uses (a ModelError is its one line, as above)."""
    from treesynth.models.loader import ServerOptions, load_model

    urls = tuple(servers[u].url if u in servers else u for u in urls)
    with pytest.raises(ModelError) as caught:
        load_model(None, server=ServerOptions(urls, **options))
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# -- (h) replicas: one generate() spread over two servers, answers in request order ------------


def test_two_replicas_share_the_requests_and_answers_keep_request_order(servers):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "word": {"type": "string", "maxLength": 12}},
        "required": ["n", "word"],
        "additionalProperties": False,
    }
    requests = [
        Request((("user", f"Write a number and a word about topic {i}."),), schema, 48, 0.9, 0.95, 1000 + i) for i in range(4)
    ]
    main, replica = servers["main"], servers["replica"]
    model = ServerModel([main.url, replica.url])
    assert model.fingerprint == ServerModel([main.url]).fingerprint == {
        "backend": "openai-server",
        "protocol": 1,
        "model": "smollm2-135m",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "build": "treesynth-test-server-1",
    }
    before = len(main.requests()), len(replica.requests())
    together = model.generate(requests)
    after = len(main.requests()), len(replica.requests())
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    assert sum(after) - sum(before) == 4
    alone = [ServerModel([main.url]).generate([r])[0].text for r in requests]
    assert len(set(alone)) > 1, alone  # distinct answers, or order could not be seen
    assert [r.text for r in together] == alone
    for response in together:
        assert json.loads(response.text).keys() == {"n", "word"}

    # A replica that goes away after start-up: its requests move to the other one.
    failover = ServerModel([main.url, replica.url], wait=0.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        failover.servers[1].port = probe.getsockname()[1]  # nothing listens there once the probe closes
    before = len(main.requests())
    assert [r.text for r in failover.generate(requests)] == alone
    assert failover.servers[1].down_until > 0 and len(main.requests()) - before == 4


# -- (e) Ctrl-C with a request in flight; the server killed mid-run, restarted ----------------


def wait_for_requests(server: ServerProcess, count: int, run: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(server.requests()) < count:
        assert run.poll() is None, "the run ended before the request was sent"
        assert time.monotonic() < deadline, f"no {count}th request within {timeout} s"
        time.sleep(0.01)


def test_interrupt_and_server_killed_mid_run_then_continued(servers, reference, tmp_path):
    replica = servers["replica"]
    store, out = tmp_path / "killed.db", tmp_path / "run.out"
    command = TREESYNTH + ["run", *TASK, "--store", str(store), "--server", replica.url, "--server-wait", "3"]
    seen = len(replica.requests())

    def start() -> subprocess.Popen:
        with open(out, "w") as handle:
            return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    # Ctrl-C while the second request is being answered: a prompt, clean stop.
    run = start()
    wait_for_requests(replica, seen + 2, run)
    interrupted = time.monotonic()
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130, out.read_text()
    assert time.monotonic() - interrupted < 5
    text = out.read_text()
    assert "interrupted; the store is consistent" in text and "Traceback" not in text, text
    committed = stored_calls(store)
    assert committed >= 1

    # Continued, then the server is killed with the next request in flight.
    seen = len(replica.requests())
    run = start()
    wait_for_requests(replica, seen + 1, run)
    replica.kill(signal.SIGKILL)
    killed = time.monotonic()
    assert run.wait(timeout=60) == 2, out.read_text()
    waited = time.monotonic() - killed
    assert 3 <= waited < 20, waited  # it waited --server-wait for the server, not forever
    error_line(out.read_text(), f"server {replica.url} stopped answering", "not back within 3 s", "nothing committed was lost")
    assert stored_calls(store) >= committed

    # The server comes back on the same address: the run continues and ends as an uninterrupted one.
    replica.start()
    replica.wait_ready()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert export(store) == reference[1]


def test_client_killed_mid_run_resends_no_finished_call(servers, reference, tmp_path):
    main = servers["main"]
    store = tmp_path / "client-killed.db"
    command = TREESYNTH + ["run", *TASK, "--store", str(store), "--server", main.url]
    seen = len(main.requests())
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_for_requests(main, seen + 3, run)  # two answered (and committed or committing), the third in flight
    run.kill()  # SIGKILL: no handler runs
    run.wait(timeout=30)
    committed = stored_calls(store)
    assert committed >= 1
    before = len(main.requests())
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    # Only the calls not in the store were sent again: the uninterrupted run's count less those committed.
    assert len(main.requests()) - before == len(reference[3]) - committed
    assert export(store) == reference[1]
