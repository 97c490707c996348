"""A small OpenAI-compatible server for the server-backend tests: standard
library HTTP in front of the REAL embedded model (LlamaCppModel, loaded once),
shaped like llama-server (GET /v1/models, /props with total_slots and
build_info, /health; POST /v1/chat/completions honouring the request's
response_format json_schema, seed, temperature, top_p and max_tokens).

Fault modes for the tests: --rate-limit N (429 with Retry-After: 1 on the
first N completions), --fail-first N (then 503 on the next N), --ignore-schema
(free text, as a server that cannot compile a schema might answer),
--require-key-env NAME (401 unless ``Authorization: Bearer $NAME``), several
--model-id, another --build-info. --log FILE appends one JSON line per completion request received,
before it is answered. --port 0 binds a free port; the bound port is printed
on stdout once the model is loaded and the server listens.

    python tests/openai_server.py --port 0 [--slots 1] [--model-id ID ...]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from treesynth.models.base import Request
from treesynth.models.embedded import default_model_path
from treesynth.models.llamacpp import LlamaCppModel

BUILD_INFO = "treesynth-test-server-1"
FREE_TEXT_TOKENS = 32  # --ignore-schema: a short free-text answer is enough to be wrong


class State:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model_path = default_model_path()
        self.model = LlamaCppModel(self.model_path, n_ctx=args.n_ctx, threads=1)
        self.model.guidance()  # the constraint's cold start, before the port is announced
        self.model_lock = threading.Lock()  # one llama.cpp context: one answer at a time
        self.count_lock = threading.Lock()
        self.completions = 0
        self.key = os.environ[args.require_key_env] if args.require_key_env else None

    def next_fault(self) -> int | None:
        """The HTTP status this completion fails with, if any."""
        with self.count_lock:
            n = self.completions
            self.completions += 1
        if n < self.args.rate_limit:
            return 429
        if n < self.args.rate_limit + self.args.fail_first:
            return 503
        return None


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = self.state.key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, {"error": {"message": "Invalid API Key", "type": "authentication_error"}})
        return False

    def do_GET(self):  # noqa: N802 - http.server's name
        args = self.state.args
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        if not self._authorised():
            return
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in args.model_id]})
        if self.path == "/props":
            return self._send(200, {
                "total_slots": args.slots,
                "model_path": str(self.state.model_path),
                "build_info": args.build_info,
                "default_generation_settings": {"n_ctx": args.n_ctx},
            })  # fmt: skip
        self._send(404, {"error": {"message": f"no {self.path}", "type": "not_found_error"}})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no {self.path}", "type": "not_found_error"}})
        if self.state.args.log:
            entry = {
                "authorization": self.headers.get("Authorization"),
                "model": body.get("model"),
                "seed": body.get("seed"),
                "cache_prompt": body.get("cache_prompt", "absent"),
                "response_format": body.get("response_format", {}).get("type"),
            }
            with open(self.state.args.log, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        if not self._authorised():
            return
        if body.get("model") not in self.state.args.model_id:
            return self._send(404, {"error": {"message": f"model {body.get('model')!r} not found", "type": "not_found_error"}})
        fault = self.state.next_fault()
        if fault == 429:
            return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, {"Retry-After": "1"})
        if fault == 503:
            return self._send(503, {"error": {"message": "busy", "type": "unavailable_error"}})
        response_format = body.get("response_format") or {}
        schema = response_format.get("json_schema", {}).get("schema") if response_format.get("type") == "json_schema" else None
        max_tokens = int(body.get("max_tokens", 256))
        if self.state.args.ignore_schema:
            schema, max_tokens = None, min(max_tokens, FREE_TEXT_TOKENS)
        request = Request(
            messages=tuple((m["role"], m["content"]) for m in body["messages"]),
            schema=schema,
            max_tokens=max_tokens,
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            seed=int(body.get("seed", 0)),
        )
        with self.state.model_lock:
            answer = self.state.model.generate([request])[0]
        self._send(200, {
            "id": f"chatcmpl-{self.state.completions}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": answer.finish_reason}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
        })  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-id", action="append", help="a served model id (repeat for several) [smollm2-135m]")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--rate-limit", type=int, default=0)
    parser.add_argument("--ignore-schema", action="store_true")
    parser.add_argument("--require-key-env", default=None)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--build-info", default=BUILD_INFO, help="what /props says the build is")
    args = parser.parse_args(argv)
    args.model_id = args.model_id or ["smollm2-135m"]
    Handler.state = State(args)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
