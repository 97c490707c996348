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
