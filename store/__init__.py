"""One SQLite file per run, through sqlite-utils, in WAL mode.

Every step of the method commits its model call, its results and the node's
new state in ONE transaction (``Store.commit``), so a run killed at any
instant restarts from the last committed step. Rows are insert-or-ignore, so
committing the same step twice is harmless. ``synchronous=FULL``: a commit is
on disk before the next model call starts, so even a power cut loses at most
the call in flight.

One writer: a run holds an exclusive ``flock`` on the store file for its
whole life, taken before SQLite opens the file for writing. The kernel drops
it when the process dies, however it dies, so a killed run never blocks the
next one.

Testing hook (documented, off unless set): ``TREESYNTH_TEST_KILL_IN_COMMIT=N``
makes the N-th ``Store.commit`` of the process SIGKILL itself after all of
the step's rows are written and before COMMIT, so the crash tests can kill a
run inside a transaction at a chosen step instead of hoping a timer lands
there."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def _import_sqlite_utils():
    """sqlite-utils imports pandas whenever it is installed (it is wherever
    `datasets` is), for one thing: to map ``pandas.Timestamp`` values to TEXT
    columns, which no treesynth row holds. That import is 0.5-0.8 s of every
    command's 1.2-1.7 s start-up on 2 cores (measured with -X importtime).
    So pandas is hidden for the duration of this one import, unless the
    process already has it; afterwards ``import pandas`` works as usual. The
    one effect left: in a process that imports treesynth.store before pandas,
    sqlite-utils does not map ``pandas.Timestamp`` (which treesynth never
    writes)."""
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils
    else:
        sys.modules["pandas"] = None  # `import pandas` raises ImportError while this is set
        try:
            import sqlite_utils
        finally:
            del sys.modules["pandas"]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()

from treesynth.store import migrations
from treesynth.store.files import (
    SQLITE_HEADER,
    StoreError,
    acquire_lock,
    check_store_file,
    close_fd,
    fsync_path,
    peek_connection,
    publish,
    remove_abandoned_creations,
    remove_files,
    unwritable,
    uri_path,
)
from treesynth.store.keys import call_key, canonical_json, content_key, node_key
from treesynth.store.records import Dropped, Node, Run, Sample

__all__ = ["SQLITE_HEADER", "CallRecord", "Dropped", "Node", "Run", "Sample", "Step", "Store", "StoreError", "acquire_lock", "check_store_file"]

KILL_IN_COMMIT_ENV = "TREESYNTH_TEST_KILL_IN_COMMIT"


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
    new_nodes: list[Node] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    run_updates: dict[str, Any] = field(default_factory=dict)


class Store:
    def __init__(
        self, path: Path, *, readonly: bool = False, lock_fd: int | None = None, conn: sqlite3.Connection | None = None
    ):
        self.path = Path(path)
        self.readonly = readonly
        self._lock_fd = lock_fd
        if conn is None and readonly:
            conn = sqlite3.connect(f"file:{uri_path(self.path)}?mode=ro", uri=True, isolation_level=None)
        elif conn is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout=10000")
        self._commits = 0
        self._kill_in_commit = int(os.environ.get(KILL_IN_COMMIT_ENV) or 0)
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
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
    def open_writer(cls, path: Path, refuse: Callable[[Run], str | None] | None = None) -> "Store":
        """The store of a run to continue: checked and locked, then its run
        row read through a read-only connection and passed to ``refuse``
        (which returns why not to continue, or None), and only then opened
        for writing; so a refused store is never written to."""
        path = Path(path)
        check_store_file(path)
        reason = unwritable(path)
        if reason:
            raise StoreError(f"cannot continue the run in {path}: {reason}; it was left untouched")
        fd = acquire_lock(path)
        try:
            if refuse is not None:
                peek = cls(path, readonly=True, conn=peek_connection(path))
                try:
                    reason = refuse(peek.run())
                finally:
                    peek.db.conn.close()
                if reason:
                    raise StoreError(reason)
            return cls(path, lock_fd=fd)
        except sqlite3.Error as error:
            os.close(fd)
            raise StoreError(f"cannot open store {path} for writing ({error}); check the file and its directory are writable") from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: Path, run: Run) -> "Store":
        """Create a store atomically and lock it: build it beside the target,
        then hard-link it into place, so the target path only ever holds a
        complete, initialised store, and a store another process created in
        the meantime is never replaced."""
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreError(f"cannot create store {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot create store {path}: directory {parent} is not writable")
        remove_abandoned_creations(path)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        lock_fd = None
        try:
            remove_files(tmp)
            # Locked from the start: an unlocked .creating file is one whose creator died.
            lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            store = cls(tmp)
            with store.transaction():
                store.db["runs"].insert({"id": 1, **run.row()})
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.db.execute("PRAGMA journal_mode=DELETE")
            store.db.conn.close()
            os.fsync(lock_fd)
            publish(tmp, path)
            fsync_path(parent, directory=True)
        except FileExistsError:
            close_fd(lock_fd)
            raise StoreError(f"cannot create store {path}: another process created it meanwhile; run again to continue it") from None
        except (sqlite3.Error, OSError) as error:
            close_fd(lock_fd)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise StoreError(f"cannot create store {path}: {reason}") from None
        except BaseException:
            close_fd(lock_fd)
            raise
        finally:
            remove_files(tmp)
        try:
            return cls(path, lock_fd=lock_fd)
        except sqlite3.Error as error:
            close_fd(lock_fd)
            raise StoreError(f"cannot open the new store {path}: {error}") from None

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
            if self.db.conn.in_transaction:
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
                self.db["nodes"].insert_all([node.row() for node in step.new_nodes], ignore=True)
            for key, fields in step.node_updates.items():
                self.db["nodes"].update(key, fields)
            if step.samples:
                self.db["samples"].insert_all([sample.row() for sample in step.samples], ignore=True)
            if step.dropped:
                self.db["dropped"].insert_all([dropped.row() for dropped in step.dropped], ignore=True)
            if step.run_updates:
                self.db["runs"].update(1, step.run_updates)
            self._commits += 1
            if self._commits == self._kill_in_commit:
                os.kill(os.getpid(), signal.SIGKILL)

    # -- runs and sessions -------------------------------------------------

    def run(self) -> Run:
        row = self.db.execute("SELECT * FROM runs WHERE id = 1").fetchone()
        cols = [d[0] for d in self.db.execute("SELECT * FROM runs LIMIT 0").description]
        return Run.from_row(dict(zip(cols, row)))

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

    # -- baseline ----------------------------------------------------------

    def baseline_mark(self) -> int | None:
        """N when the store is a baseline of N samples, else None (also for stores older than the mark)."""
        if "baseline" not in self.db.table_names():
            return None
        row = self.db.execute("SELECT samples FROM baseline WHERE id = 1").fetchone()
        return row[0] if row else None

    def create_baseline(self, root: Node, samples: int, created: str) -> None:
        """The baseline's root leaf and its mark, in one transaction."""
        with self.transaction():
            self.db["nodes"].insert(root.row())
            self.db["baseline"].insert({"id": 1, "samples": samples, "created": created})

    # -- calls -------------------------------------------------------------

    def call_count(self, role: str | None = None) -> int:
        if role is None:
            return self.db.execute("SELECT count(*) FROM calls").fetchone()[0]
        return self.db.execute("SELECT count(*) FROM calls WHERE role = ?", [role]).fetchone()[0]

    def cached_call(self, key: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM calls WHERE key = ?", [key]))
        return rows[0] if rows else None

    # -- nodes -------------------------------------------------------------

    def nodes(self, states: Sequence[str] | None = None, depth: int | None = None) -> list[Node]:
        """Nodes breadth-first (by depth, then tree position), optionally only those in ``states`` and at ``depth``."""
        clauses, params = ["1"], []
        if states is not None:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if depth is not None:
            clauses.append("depth = ?")
            params.append(depth)
        sql = f"SELECT * FROM nodes WHERE {' AND '.join(clauses)} ORDER BY depth, position"
        return [Node.from_row(r) for r in self.db.query(sql, params)]

    def nodes_in_tree_order(self) -> list[Node]:
        """Nodes depth-first: each node followed by its subtree."""
        return [Node.from_row(r) for r in self.db.query("SELECT * FROM nodes ORDER BY position")]

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

    def kept_texts(self) -> Iterator[tuple[str, bytes | None]]:
        """(data JSON, stored vector) of every kept sample, in the order they were committed."""
        cursor = self.db.execute("SELECT data, vector FROM samples ORDER BY rowid")
        while batch := cursor.fetchmany(2048):
            yield from batch

    def sample_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM samples").fetchone()[0]

    def dropped_reasons(self) -> dict[str, int]:
        """How many samples were dropped, by reason (near duplicates counted together)."""
        if "dropped" not in self.db.table_names():
            return {}
        rows = self.db.execute(
            "SELECT CASE WHEN reason LIKE 'near duplicate%' THEN 'near duplicate' ELSE reason END AS why, count(*) "
            "FROM dropped GROUP BY why ORDER BY count(*) DESC, why"
        ).fetchall()
        return dict(rows)

    def leaf_counts(self) -> dict[str, tuple[int, int]]:
        """Per leaf key: (kept samples, dropped samples)."""
        kept = dict(self.db.execute("SELECT leaf, count(*) FROM samples GROUP BY leaf").fetchall())
        dropped = {}
        if "dropped" in self.db.table_names():
            dropped = dict(self.db.execute("SELECT leaf, count(*) FROM dropped GROUP BY leaf").fetchall())
        return {key: (kept.get(key, 0), dropped.get(key, 0)) for key in set(kept) | set(dropped)}

    def iter_samples(self) -> Iterator[tuple[str, str, str]]:
        """(leaf, data JSON, attributes JSON) in tree order; streams from one index."""
        cursor = self.db.execute(
            "SELECT leaf, data, attributes FROM samples ORDER BY position, call, idx"
        )
        while batch := cursor.fetchmany(2048):
            yield from batch

    def iter_sample_rows(self) -> Iterator[tuple[str, str, str, str]]:
        """(leaf, data JSON, attributes JSON, content hash) in tree order; streams."""
        cursor = self.db.execute(
            "SELECT leaf, data, attributes, hash FROM samples ORDER BY position, call, idx"
        )
        while batch := cursor.fetchmany(2048):
            yield from batch

    def sessions(self) -> list[dict[str, Any]]:
        """Every session in order, its settings decoded."""
        rows = []
        for row in self.db.query("SELECT * FROM sessions ORDER BY id"):
            row = dict(row)
            row["settings"] = json.loads(row["settings"]) if row["settings"] else {}
            rows.append(row)
        return rows

    def integrity_problems(self) -> list[str]:
        """SQLite's own integrity check: an empty list when the file is sound."""
        return [line for (line,) in self.db.execute("PRAGMA integrity_check").fetchall() if line != "ok"]

    def verify(self) -> Iterator[str]:
        """Recompute every stored hash and key; yields one line per mismatch.

        The run's config hash; each node's key from its parent's key and its
        attribute; each call's key from the run's model fingerprint and the
        stored request; each sample's content hash. Streams, so memory stays
        flat on a store of any size."""
        run = self.run()
        if content_key(run.config) != run.config_hash:
            yield "run: config hash mismatch (the stored config was changed)"
        nodes = self.db.execute("SELECT key, parent, depth, path FROM nodes")
        while batch := nodes.fetchmany(2048):
            for key, parent, depth, path in batch:
                if _node_key(parent, json.loads(path)) != key:
                    yield f"node {key}: key does not match its parent and attribute"
        calls = self.db.execute("SELECT key, request FROM calls")
        while batch := calls.fetchmany(2048):
            for key, request in batch:
                if call_key(run.model, json.loads(request)) != key:
                    yield f"call {key}: key does not match the stored request and model"
        samples = self.db.execute("SELECT leaf, call, idx, data, hash FROM samples")
        while batch := samples.fetchmany(2048):
            for leaf, call, idx, data, stored in batch:
                if content_key(json.loads(data)) != stored:
                    yield f"sample {leaf}/{call}/{idx}: hash mismatch"


def _node_key(parent: str | None, path: list) -> str:
    return node_key(parent) if parent is None else node_key(parent, *path[-1])


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
