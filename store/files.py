"""The store file itself, before and around SQLite: refusing a file that is
not a treesynth store (or is cut short) without touching it, the
single-writer lock, and publishing a newly built store under its name."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Iterable

SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(RuntimeError):
    """A user-caused store problem; the CLI prints it as one line."""


# -- checking a file before touching it ------------------------------------


def check_store_file(path: Path) -> None:
    """Refuse, without modifying it, a file that is not a treesynth store or
    is visibly damaged (truncated)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except IsADirectoryError:
        raise StoreError(f"{path} is a directory, not a store file") from None
    except OSError as error:
        raise StoreError(f"cannot read store {path}: {error.strerror}") from None
    if header[: len(SQLITE_HEADER)] != SQLITE_HEADER:
        raise StoreError(f"{path} is not a treesynth store (not an SQLite file); it was left untouched")
    truncated = _truncation(path, header, size)
    if truncated:
        raise StoreError(f"{path} is damaged ({truncated}); it was left untouched. Restore it from a copy or use a new --store")
    try:
        conn = peek_connection(path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a readable treesynth store ({error}); it was left untouched") from None
    if "_treesynth_migrations" not in tables or runs != 1:
        raise StoreError(f"{path} is an SQLite file but not a treesynth store; it was left untouched")


def peek_connection(path: Path) -> sqlite3.Connection:
    """A read-only connection that leaves no trace: with no WAL file beside
    the store there is nothing uncheckpointed to read, so the file is opened
    as immutable and SQLite creates no -wal or -shm file next to it (which a
    plain read-only connection to a WAL-mode file would, and leave behind)."""
    wal = Path(str(path) + "-wal")
    mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    return sqlite3.connect(f"file:{uri_path(path)}?{mode}", uri=True, isolation_level=None)


def uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(Path(path).absolute()))


def _truncation(path: Path, header: bytes, size: int) -> str | None:
    """Why the file is shorter than its own header says, or None.

    The header records the page size and (when the 'valid-for' counter matches
    the change counter) the database size in pages. A WAL file beside it may
    legitimately hold pages not yet copied back (a checkpoint cut short by a
    kill), so with a non-empty WAL the check is left to SQLite's recovery."""
    if len(header) < 100:
        return f"only {size} bytes, shorter than an SQLite header"
    wal = Path(str(path) + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"invalid page size {page_size} in its header"
    if size % page_size:
        return f"{size} bytes is not a whole number of {page_size}-byte pages"
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and pages * page_size > size:
        return f"{size} bytes, but its header says {pages * page_size}: the file was cut short"
    return None


# -- the single-writer lock ----------------------------------------------


def acquire_lock(path: Path) -> int:
    """An exclusive flock on the store file, or StoreError naming the holder.

    Taken on a descriptor of our own before SQLite opens the file, and closed
    only after SQLite's connection is closed: closing any descriptor of a file
    drops the process's POSIX locks on it, which SQLite relies on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _live_writer_pid(path)
        who = f" (pid {holder})" if holder else ""
        raise StoreError(
            f"{path} is being written by another treesynth process{who}; wait for it to finish or stop it, then run again"
        ) from None
    return fd


def _live_writer_pid(path: Path) -> int | None:
    try:
        conn = peek_connection(path)
        try:
            row = conn.execute("SELECT pid FROM sessions ORDER BY id DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        if row and row[0]:
            os.kill(row[0], 0)
            return row[0]
    except (sqlite3.Error, OSError):
        pass
    return None


def unwritable(path: Path) -> str | None:
    """Why a run could not write to this store (file, -wal, -shm, or the
    directory that must hold the -wal and -shm files), or None."""
    if not os.access(path, os.W_OK):
        return "the file is not writable"
    parent = path.parent if str(path.parent) else Path(".")
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists() and not os.access(side, os.W_OK):
            return f"{side.name} is not writable"
        if not side.exists() and not os.access(parent, os.W_OK):
            return f"its directory {parent} is not writable"
    return None


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- publishing a new store --------------------------------------------------


def publish(tmp: Path, path: Path) -> None:
    """Give the finished file its name; never replace an existing one."""
    try:
        os.link(tmp, path)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        # A filesystem without hard links: rename, after a last look.
        if path.exists():
            raise FileExistsError(path) from None
        os.rename(tmp, path)


def remove_abandoned_creations(path: Path) -> None:
    """Remove ``.NAME.creating-PID`` files whose creator died: its pid is gone
    and nobody holds the file's lock."""
    for leftover in path.parent.glob(f".{path.name}.creating-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process is creating it
        finally:
            os.close(fd)
        remove_files(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def close_fd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def write_atomically(path: Path, chunks: Iterable[str]) -> int:
    """Write text through a temp file beside ``path``, flushed to disk, then
    renamed over it: ``path`` holds the old file or the whole new one, never
    half of one. Returns the number of chunks written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
