"""One SQLite file per run, through sqlite-utils, in WAL mode.

Every step of the method commits its model call, its results and the node's
new state in ONE transaction (``Store.commit``), so a run killed at any
instant restarts from the last committed step. Rows are insert-or-ignore, so
committing the same step twice is harmless."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from treesynth.store import migrations
from treesynth.store.keys import canonical_json, content_key

SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(RuntimeError):
    """A user-caused store problem; the CLI prints it as one line."""


@dataclass
class CallRecord:
    key: str
    node: str
    role: str
    step: str
    attempt: int
    request: dict[str, Any]
    response: str
    completion_tokens: int
    prompt_tokens: int
    seconds: float
    finish_reason: str


@dataclass
class Step:
    """What one step of the method writes, all or nothing."""

    call: CallRecord | None = None
    node_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_nodes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def check_store_file(path: Path) -> None:
    """Refuse, without modifying it, a file that is not a treesynth store."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as error:
        raise StoreError(f"cannot read store {path}: {error.strerror}") from None
    if header != SQLITE_HEADER:
        raise StoreError(f"{path} is not a treesynth store (not an SQLite file); it was left untouched")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a readable treesynth store ({error}); it was left untouched") from None
    if "_treesynth_migrations" not in tables or runs != 1:
        raise StoreError(f"{path} is an SQLite file but not a treesynth store; it was left untouched")


class Store:
    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(str(self.path), isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self._lock_fd: int | None = None
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrations.apply(self.db)

    # -- opening ---------------------------------------------------------

    @classmethod
    def open_existing(cls, path: Path, *, readonly: bool = True) -> "Store":
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}")
        check_store_file(path)
        return cls(path, readonly=readonly)

    @classmethod
    def create(cls, path: Path, run: dict[str, Any]) -> "Store":
        """Create a store atomically: build it beside the target, then rename,
        so the target path only ever holds a complete, initialised store."""
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreError(f"cannot create store {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot create store {path}: directory {parent} is not writable")
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        try:
            store = cls(tmp)
            with store.transaction():
                store.db["runs"].insert({"id": 1, **run})
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.db.execute("PRAGMA journal_mode=DELETE")
            store.close()
            os.rename(tmp, path)
        except sqlite3.OperationalError as error:
            raise StoreError(f"cannot create store {path}: {error}") from None
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
        return cls(path)

    def lock(self) -> None:
        """Hold the single-writer lock for this process's life. The kernel
        drops it when the process dies, so a killed run never blocks the next."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is being written by another treesynth process; wait for it or stop it") from None
        self._lock_fd = fd

    def close(self) -> None:
        self.db.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- transactions ----------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def commit(self, step: Step, session: int | None = None) -> None:
        with self.transaction():
            if step.call is not None:
                row = dict(step.call.__dict__)
                row["request"] = canonical_json(row["request"])
                row["session"] = session
                self.db["calls"].insert(row, ignore=True)
            if step.new_nodes:
                self.db["nodes"].insert_all(step.new_nodes, ignore=True)
            for key, fields in step.node_updates.items():
                self.db["nodes"].update(key, fields)
            if step.samples:
                self.db["samples"].insert_all(step.samples, ignore=True)

    # -- runs and sessions -------------------------------------------------

    def run(self) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM runs WHERE id = 1").fetchone()
        cols = [d[0] for d in self.db.execute("SELECT * FROM runs LIMIT 0").description]
        data = dict(zip(cols, row))
        data["config"] = json.loads(data["config"])
        data["model"] = json.loads(data["model"])
        return data

    def begin_session(self, settings: dict[str, Any], resumed: bool) -> int:
        with self.transaction():
            return self.db["sessions"].insert(
                {
                    "started": _now(),
                    "pid": os.getpid(),
                    "settings": canonical_json(settings),
                    "resumed": int(resumed),
                }
            ).last_pk

    # -- calls -------------------------------------------------------------

    def cached_call(self, key: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM calls WHERE key = ?", [key]))
        return rows[0] if rows else None

    # -- nodes -------------------------------------------------------------

    def node(self, key: str) -> dict[str, Any]:
        return _decode_node(self.db["nodes"].get(key))

    def nodes(self, where: str = "1", params: list[Any] | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM nodes WHERE {where} ORDER BY depth, position"
        return [_decode_node(r) for r in self.db.query(sql, params or [])]

    def has_root(self) -> bool:
        return self.db.execute("SELECT count(*) FROM nodes WHERE depth = 0").fetchone()[0] > 0

    # -- reading -----------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        states = dict(self.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall())
        calls, tokens, seconds = self.db.execute(
            "SELECT count(*), coalesce(sum(completion_tokens), 0), coalesce(sum(seconds), 0) FROM calls"
        ).fetchone()
        samples = self.db.execute("SELECT count(*) FROM samples").fetchone()[0]
        sessions = self.db.execute("SELECT count(*) FROM sessions").fetchone()[0]
        return {
            "states": states,
            "calls": calls,
            "tokens": tokens,
            "model_seconds": seconds,
            "samples": samples,
            "sessions": sessions,
        }

    def iter_samples(self) -> Iterator[tuple[str, str, str]]:
        """(leaf, data JSON, attributes JSON) in tree order; streams from one index."""
        cursor = self.db.execute(
            "SELECT leaf, data, attributes FROM samples ORDER BY position, call, idx"
        )
        while batch := cursor.fetchmany(2048):
            yield from batch

    def verify(self) -> list[str]:
        """Recompute every stored hash; returns one line per mismatch."""
        problems = []
        for row in self.db.query("SELECT leaf, call, idx, data, hash FROM samples"):
            if content_key(json.loads(row["data"])) != row["hash"]:
                problems.append(f"sample {row['leaf']}/{row['call']}/{row['idx']}: hash mismatch")
        return problems


_JSON_COLUMNS = ("path", "pivots", "labels", "value_list", "plan")


def _decode_node(row: dict[str, Any]) -> dict[str, Any]:
    node = dict(row)
    for col in _JSON_COLUMNS:
        if node.get(col) is not None:
            node[col] = json.loads(node[col])
    return node


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
