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


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "run.db"
