"""OpenAI-compatible server backend: llama-server, vLLM, SGLang or any server
that answers ``POST /v1/chat/completions`` with a ``response_format`` json_schema.

Only the URLs given are contacted (``--server``, repeatable: replicas of one
model serve one run). HTTP is the standard library's, one connection per call.
A ``generate`` list is spread over the servers, at most ``concurrency`` in
flight per server, answers in request order; the engine today sends one
request at a time (batching a breadth-first level is another issue), so
replicas take turns rather than working at once.

Trust: a server may ignore a schema it cannot compile, so every answer is
parsed and validated here against the request's schema; an answer that is not
valid is never returned as valid. An answer cut off at max_tokens
(``finish_reason: length``) is returned as cut off when it is a prefix of JSON
(the engine rejects it and stores it as cut off); anything else that does not
validate stops the run with a ModelError naming the server.

Identity: the fingerprint is what the server says about its model (the model
id; llama-server's ``/props`` adds the model file's name and its build) plus
this client's request protocol. URLs and the API key are not in it, so a run
may continue on other replicas of the same model; every replica must say the
same about itself. The API key is read from an environment variable and only
ever sent as ``Authorization: Bearer``.

Faults: refused or dropped connections, timeouts, HTTP 5xx and 429 (with its
``Retry-After``) are retried a bounded number of times with exponential
backoff; the jitter only spreads retries in time, never touches a request.
A server that goes away is polled (``/health``, else ``/v1/models``) for up
to ``wait`` seconds; with replicas, the request moves to another one.

Determinism is the server's: llama-server gets ``cache_prompt: false`` (a
reused prompt prefix makes an answer depend on the calls before it); vLLM and
SGLang have their own deterministic modes. Resume is exact regardless, since
finished calls are replayed from the store."""

from __future__ import annotations

import http.client
import json
import posixpath
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

from treesynth.models.base import TEXT_PATTERN, ModelError, Request, Response
from treesynth.store.keys import canonical_json

BACKEND = "openai-server"
# The request this client sends (body fields, llama-server's cache_prompt off,
# client-side validation): bump it when the request changes, as it changes answers.
PROTOCOL = 1
DEFAULT_WAIT = 60.0
META_TIMEOUT = 10.0  # /v1/models, /props, /health
CALL_TIMEOUT = 600.0  # one completion, not streamed: nothing arrives before the whole answer
MAX_ATTEMPTS = 6
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0
POLL_SECONDS = 0.5
DOWN_SECONDS = 60.0  # a replica that did not come back is skipped this long, then probed again

_jitter = random.Random()  # timing only: unseeded on purpose, never used for content


class _Transport(Exception):
    """The server could not be reached, or dropped the connection."""


class _Down(Exception):
    """A server went away and did not come back within the wait."""


class _Batch:
    """The state one ``generate`` list shares between its worker threads."""

    def __init__(self, requests: Sequence[Request]):
        self.requests = requests
        self.results: list[Response | None] = [None] * len(requests)
        self.pending = deque(range(len(requests)))
        self.lock = threading.Lock()
        self.failures: list[BaseException] = []
        self.downs: list[str] = []
        self.active = 0
        self.finished = threading.Event()

    def start_round(self, workers: int) -> None:
        self.active = workers
        self.finished = threading.Event()


@dataclass
class Server:
    url: str  # as shown in messages: scheme://host:port[/prefix]
    https: bool
    host: str
    port: int
    prefix: str
    slots: int | None = None
    llama: bool = False  # llama-server, recognised by its /props
    info: dict[str, Any] = field(default_factory=dict)
    down_until: float = 0.0


def parse_url(url: str) -> Server:
    """A server from a base URL; a trailing ``/v1`` (OpenAI's base URL form) is dropped."""
    parts = urlsplit(url.strip())
    if parts.username or parts.password:  # not echoed: it holds a credential
        raise ModelError("a --server URL may not hold a user or password; give an API key with --api-key-env NAME")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"--server {url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ModelError(f"--server {url!r}: give scheme://host:port[/path] only")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ModelError(f"--server {url!r} has a bad port") from None
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    host = parts.hostname
    shown = f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}:{port}{prefix}"
    return Server(url=shown, https=parts.scheme == "https", host=host, port=port, prefix=prefix)


class ServerModel:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str | None = None,
        parallel: int | None = None,
        api_key: str | None = None,
        wait: float = DEFAULT_WAIT,
        call_timeout: float = CALL_TIMEOUT,
    ):
        if not urls:
            raise ModelError("give at least one --server URL")
        self.servers = [parse_url(u) for u in urls]
        if len({s.url for s in self.servers}) != len(self.servers):
            raise ModelError("the same --server URL is given twice")
        self.wait = wait
        self.call_timeout = call_timeout
        self._parallel = parallel
        self.__api_key = api_key  # name-mangled: kept out of repr, the fingerprint and messages
        self._validators: dict[str, Any] = {}
        self._turn = 0
        for server in self.servers:
            self._describe(server, model)
        first = self.servers[0]
        for other in self.servers[1:]:
            if other.info != first.info:
                raise ModelError(
                    f"the servers do not serve the same model: {first.url} says {canonical_json(first.info)}, "
                    f"{other.url} says {canonical_json(other.info)}"
                )
        self._fingerprint = {"backend": BACKEND, "protocol": PROTOCOL, **first.info}

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    @property
    def parallel(self) -> int:
        """Requests in flight at once over all servers: the driver sizes its batches by it."""
        return sum(self.concurrency(server) for server in self.servers)

    def concurrency(self, server: Server) -> int:
        """Requests in flight at once on a server: its slots where it reports them
        (capped by --server-parallel when given), else --server-parallel, else 1."""
        if server.slots:
            return min(server.slots, self._parallel) if self._parallel else server.slots
        return self._parallel or 1

    # -- start-up ---------------------------------------------------------------

    def _describe(self, server: Server, wanted: str | None) -> None:
        """What the server says about itself: its model id, and for llama-server
        the model file, build and slots. Start-up does not wait for a server that
        refuses connections (a wrong URL fails at once), only for one that is
        still loading (503)."""
        models = self._start_json(server, "/v1/models")
        ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)] if isinstance(models, dict) else []
        ids = [i for i in ids if isinstance(i, str)]
        if wanted is not None:
            if wanted not in ids:
                raise ModelError(f"server {server.url} does not serve model {wanted!r} (it serves: {', '.join(ids) or 'none'})")
            model_id = wanted
        elif len(ids) == 1:
            model_id = ids[0]
        elif not ids:
            raise ModelError(f"server {server.url} lists no model at /v1/models")
        else:
            raise ModelError(f"server {server.url} serves several models ({', '.join(ids)}); choose one with --server-model NAME")
        info: dict[str, Any] = {"model": model_id}
        props = self._props(server)
        if props is not None:
            server.llama = True
            if isinstance(props.get("total_slots"), int) and props["total_slots"] > 0:
                server.slots = props["total_slots"]
            if isinstance(props.get("model_path"), str) and props["model_path"]:
                info["file"] = posixpath.basename(props["model_path"].replace("\\", "/"))
            if isinstance(props.get("build_info"), str) and props["build_info"]:
                info["build"] = props["build_info"]
        server.info = info

    def _start_json(self, server: Server, path: str) -> Any:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                status, _, data = self._http(server, "GET", path, timeout=META_TIMEOUT)
            except _Transport as error:
                raise ModelError(f"cannot reach server {server.url}: {error}") from None
            if status == 200:
                try:
                    return json.loads(data)
                except ValueError:
                    raise ModelError(f"server {server.url} answered GET {path} with something that is not JSON") from None
            if status in (401, 403):
                how = "the API key was refused" if self.__api_key else "it needs an API key: give --api-key-env NAME"
                raise ModelError(f"server {server.url} answered GET {path} with HTTP {status}: {how}")
            if status in (429, 502, 503, 504) and time.monotonic() < deadline:  # still loading, or busy
                time.sleep(POLL_SECONDS)
                continue
            raise ModelError(f"server {server.url} answered GET {path} with HTTP {status}{_message(data)}")

    def _props(self, server: Server) -> dict[str, Any] | None:
        """llama-server's /props, or None from a server that has none (vLLM, SGLang)."""
        try:
            status, _, data = self._http(server, "GET", "/props", timeout=META_TIMEOUT)
        except _Transport as error:
            raise ModelError(f"cannot reach server {server.url}: {error}") from None
        if status != 200:
            return None
        try:
            props = json.loads(data)
        except ValueError:
            return None
        if not isinstance(props, dict) or not ({"total_slots", "model_path", "build_info"} & props.keys()):
            return None
        return props

    # -- generation ---------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        """Each request's answer, in request order. One request runs in the calling
        thread; several are spread over the servers, each server's share bounded
        by its concurrency, in daemon threads (an interrupted run never waits for
        them)."""
        for request in requests:
            if request.schema is not None and TEXT_PATTERN in request.schema:
                raise ModelError(
                    "the server backend cannot constrain an answer to a text pattern (x-text-pattern): "
                    "OpenAI-compatible servers take JSON schemas only; use a local --model for this task"
                )
        if len(requests) == 1:
            return [self._one(requests[0])]
        return self._many(requests) if requests else []

    def _usable(self) -> list[Server]:
        """Servers not known to be down; a server whose down time has passed is probed first."""
        now = time.monotonic()
        usable = []
        for server in self.servers:
            if server.down_until and server.down_until <= now:
                server.down_until = 0.0 if self._healthy(server) else now + DOWN_SECONDS
            if not server.down_until:
                usable.append(server)
        return usable

    def _one(self, request: Request) -> Response:
        downs: list[str] = []
        while True:
            usable = self._usable()
            if not usable:
                raise ModelError("; ".join(downs) or _all_down(self.servers))
            server = usable[self._turn % len(usable)]
            self._turn += 1
            try:
                return self._complete(server, request)
            except _Down as down:
                server.down_until = time.monotonic() + DOWN_SECONDS
                downs.append(str(down))

    def _many(self, requests: Sequence[Request]) -> list[Response]:
        batch = _Batch(requests)
        while batch.pending:
            usable = self._usable()
            if not usable:
                raise ModelError("; ".join(batch.downs) or _all_down(self.servers))
            # One round of workers: ends with every request answered, a failure,
            # or a server down (its requests go back for the next round's servers).
            workers = [s for s in usable for _ in range(min(self.concurrency(s), len(batch.pending)))]
            batch.start_round(len(workers))
            for server in workers:
                threading.Thread(target=self._work, args=(batch, server), daemon=True, name=f"treesynth {server.url}").start()
            try:
                while not batch.finished.wait(0.2):
                    pass
            except BaseException:  # Ctrl-C: workers take no new request; in-flight ones die with the process
                with batch.lock:
                    batch.failures.append(KeyboardInterrupt())
                raise
            if batch.failures:
                raise batch.failures[0]
        return [r for r in batch.results if r is not None]

    def _work(self, batch: _Batch, server: Server) -> None:
        try:
            while True:
                with batch.lock:
                    if batch.failures or not batch.pending or server.down_until:
                        return
                    index = batch.pending.popleft()
                try:
                    batch.results[index] = self._complete(server, batch.requests[index])
                except _Down as down:
                    with batch.lock:
                        batch.pending.appendleft(index)  # another replica takes it
                        server.down_until = time.monotonic() + DOWN_SECONDS
                        batch.downs.append(str(down))
                    return
                except BaseException as error:  # noqa: BLE001 - handed to the calling thread
                    with batch.lock:
                        batch.failures.append(error)
                    return
        finally:
            with batch.lock:
                batch.active -= 1
                if not batch.active:
                    batch.finished.set()

    # -- one call -------------------------------------------------------------------

    def _body(self, server: Server, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": server.info["model"],
            "messages": [{"role": role, "content": content} for role, content in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stream": False,
        }
        if request.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
            }
        if server.llama:
            body["cache_prompt"] = False  # a reused prefix would make the answer depend on earlier calls
        return body

    def _complete(self, server: Server, request: Request) -> Response:
        body = self._body(server, request)
        started = time.perf_counter()
        last = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                status, retry_after, data = self._http(server, "POST", "/v1/chat/completions", body, timeout=self.call_timeout)
            except _Transport as error:
                last = str(error)
                if attempt < MAX_ATTEMPTS:
                    self._wait_for(server, last)
                    time.sleep(_delay(attempt, None))  # back: still no hammering of a server that drops requests
                continue
            if status == 200:
                return self._response(server, request, data, time.perf_counter() - started, attempt)
            if status == 429 or status >= 500:
                last = f"HTTP {status}{_message(data)}"
                if attempt < MAX_ATTEMPTS:
                    time.sleep(_delay(attempt, retry_after if status == 429 else None))
                continue
            if status in (401, 403):
                how = "the API key was refused" if self.__api_key else "it needs an API key: give --api-key-env NAME"
                raise ModelError(f"server {server.url} answered HTTP {status}: {how}")
            raise ModelError(f"server {server.url} refused a completion request: HTTP {status}{_message(data)}")
        raise ModelError(f"server {server.url} failed {MAX_ATTEMPTS} attempts at one request (last: {last})")

    def _response(self, server: Server, request: Request, data: bytes, seconds: float, attempts: int) -> Response:
        try:
            payload = json.loads(data)
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise ModelError(f"server {server.url} answered with something that is not an OpenAI chat completion ({error})") from None
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        problem = self._problem(request, text, finish)
        if problem:
            raise ModelError(
                f"server {server.url} ignored the response_format json_schema: {problem}; "
                "treesynth stores only answers that match their schema (use a server that enforces json_schema)"
            )
        return Response(
            text=text,
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            seconds=seconds,
            finish_reason=finish,
            extra={"server": server.url, "attempts": attempts},
        )

    def _problem(self, request: Request, text: str, finish: str) -> str | None:
        """Why an answer cannot have come from a server that enforced the schema, or None."""
        if request.schema is None:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            if finish == "length" and json_prefix(text):
                return None  # cut off at max_tokens: returned as cut off, never as a valid answer
            return f"its answer is not JSON ({_snippet(text)})"
        import jsonschema

        key = canonical_json(request.schema)
        validator = self._validators.get(key)
        if validator is None:
            validator = jsonschema.validators.validator_for(request.schema)(request.schema)
            self._validators[key] = validator
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "the answer"
        return f"its answer breaks the schema ({where}: {error.validator}; {_snippet(text)})"

    # -- transport --------------------------------------------------------------------

    def _http(self, server: Server, method: str, path: str, body: Any = None, *, timeout: float) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body bytes) of one request on a fresh connection."""
        connection_class = http.client.HTTPSConnection if server.https else http.client.HTTPConnection
        connection = connection_class(server.host, server.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        try:
            connection.request(method, server.prefix + path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheader("Retry-After"), response.read()
        except (OSError, http.client.HTTPException) as error:
            raise _Transport(_reason(error)) from None
        finally:
            connection.close()

    def _healthy(self, server: Server) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                status, _, _ = self._http(server, "GET", path, timeout=min(META_TIMEOUT, 2.0))
            except _Transport:
                return False
            if status == 200:
                return True
            if status != 404:  # 503 while loading: there is a /health, and it says no
                return False
        return False

    def _wait_for(self, server: Server, reason: str) -> None:
        """Return once the server answers its health check again; _Down after ``wait`` seconds."""
        deadline = time.monotonic() + self.wait
        while True:
            if self._healthy(server):
                return
            if time.monotonic() >= deadline:
                raise _Down(f"server {server.url} stopped answering ({reason}) and was not back within {self.wait:g} s")
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _all_down(servers: Sequence[Server]) -> str:
    return "no server is answering: " + ", ".join(s.url for s in servers) + f" (each is probed again after {DOWN_SECONDS:g} s)"


def _delay(attempt: int, retry_after: str | None) -> float:
    """Exponential backoff with jitter; at least a 429's Retry-After (seconds form), capped."""
    backoff = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (attempt - 1)) * (0.5 + _jitter.random())
    if retry_after is not None:
        try:
            return min(RETRY_AFTER_CAP, max(0.0, float(retry_after))) + 0.1 * _jitter.random()
        except ValueError:  # the HTTP-date form: plain backoff
            pass
    return backoff


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _message(data: bytes) -> str:
    """The error message of a server's error body, on one line, short."""
    try:
        payload = json.loads(data)
        message = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(message, dict):
            message = message.get("message", message)
        text = message if isinstance(message, str) else json.dumps(message)
    except ValueError:
        text = data.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return f" ({text[:200]})" if text else ""


def _snippet(text: str) -> str:
    return repr(" ".join(text.split())[:60]) + ("..." if len(text) > 60 else "")


# -- a prefix of JSON ----------------------------------------------------------------

_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*'
_TOKEN = re.compile(rf'\s*(?:([{{}}\[\],:])|({_STRING}")|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null))')
_PARTIAL_STRING = re.compile(rf"\s*{_STRING}(?:\\(?:u[0-9a-fA-F]{{0,3}})?)?\Z")
_PARTIAL_SCALAR = re.compile(r"\s*(?:-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?)\Z")


def json_prefix(text: str) -> bool:
    """Whether ``text`` is the beginning of some JSON document (what a server that
    enforces a JSON grammar leaves when max_tokens cuts its answer)."""
    stack: list[str] = []
    expect = "value"  # value, value|], key|}, key, :, ,|end, done
    position = 0
    while True:
        rest = text[position:]
        if not rest.strip():
            return True
        if expect in ("value", "value|]") and (_PARTIAL_STRING.match(rest) or _PARTIAL_SCALAR.match(rest)):
            return True
        if expect in ("key", "key|}") and _PARTIAL_STRING.match(rest):
            return True
        match = _TOKEN.match(text, position)
        if match is None:
            return False
        position = match.end()
        mark, string, scalar = match.groups()
        value_done = False
        if expect in ("value", "value|]"):
            if mark == "{":
                stack.append("{")
                expect = "key|}"
            elif mark == "[":
                stack.append("[")
                expect = "value|]"
            elif string is not None or scalar is not None:
                value_done = True
            elif mark == "]" and expect == "value|]":
                stack.pop()
                value_done = True
            else:
                return False
        elif expect in ("key", "key|}"):
            if string is not None:
                expect = ":"
            elif mark == "}" and expect == "key|}":
                stack.pop()
                value_done = True
            else:
                return False
        elif expect == ":":
            if mark != ":":
                return False
            expect = "value"
        elif expect == ",|end":
            if mark == ",":
                expect = "key" if stack[-1] == "{" else "value"
            elif mark is not None and mark in "}]" and stack[-1] == {"}": "{", "]": "["}[mark]:
                stack.pop()
                value_done = True
            else:
                return False
        else:  # done: nothing may follow a whole document
            return False
        if value_done:
            expect = ",|end" if stack else "done"
