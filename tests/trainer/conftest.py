"""Fixtures for the trainer tests: the fitted toy teacher (shared with the server tests' cache folder)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def toy_teacher_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fitted toy teacher's folder, fitted once and cached in pytest's cache folder (like tests/server)."""
    from brts.server.toy import fit_toy_model

    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("toy-teacher")) if cache is not None else tmp_path_factory.mktemp("toy-teacher")
    return fit_toy_model(folder, quality="teacher")
