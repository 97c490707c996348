from __future__ import annotations

from pathlib import Path

import pytest

from treesynth.models.fake import FakeModel


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "run.db"
