from __future__ import annotations

import signal
from pathlib import Path

import pytest

from treesynth.models.fake import FakeModel

# A test run started in the background by a shell without job control
# (`nohup make test &`) inherits SIGINT ignored, and so would every process the
# tests start: the Ctrl-C tests would then send signals nobody hears. A Python
# handler (unlike SIG_IGN) is reset to the default by exec, so the children
# get Python's own KeyboardInterrupt back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` runs each file whole on one of two workers (--dist loadfile), and
# xdist hands files out in collection order (--no-loadscope-reorder; its own
# order is by test count). The files that take longest go first, so that the
# short ones fill in at the end: in xdist's order, one worker sat idle for the
# last 18 s of a 265 s run while the other finished the fake-model kill series.
# A stale list costs balance, never correctness.
LONGEST_FIRST = (
    "test_crash.py",  # ~70 s: two kill series of real processes
    "test_constraints.py",  # ~70 s: both models, SmolLM2 and Gemma
    "test_crash_real_model.py",  # ~60 s
    "test_server.py",  # ~50 s: four model servers
    "test_batching.py",  # ~40 s
    "test_bench.py",  # ~35 s
    "test_presets.py",  # ~25 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M, loaded once per test process (per worker
    under pytest-xdist) and shared by the real-model tests that need no
    settings of their own: one thread, a 2048-token context, two sequences.
    Sharing it is itself a check: its answers may not depend on what it
    decoded for earlier tests (batch and history invariance)."""
    from treesynth.models.embedded import default_model_path
    from treesynth.models.llamacpp import LlamaCppModel

    return LlamaCppModel(default_model_path(), n_ctx=2048, threads=1, parallel=2)


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "run.db"
