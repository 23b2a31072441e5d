"""Fixtures for the reliability tests (real `brts serve` / `brts prewarm` processes on 127.0.0.1, killed and fuzzed).

``toy_teacher_dir`` is tests/conftest.py's: the same fitted toy teacher in pytest's cache folder
(``.pytest_cache/d/toy-teacher``) that the server and trainer tests use, so these tests never fit it again. The
``forks`` fork server (forkserver.py) imports torch and transformers once for the whole directory, so each of the
many server starts costs seconds, not the ~10 s of imports of a fresh interpreter on a loaded 2-core machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from forkserver import ForkServer  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


@pytest.fixture(scope="package")
def forks():
    """One fork server for the reliability tests, gone when they are done (it holds ~0.4 GB of imports); closing
    it SIGKILLs whatever child is still running."""
    server = ForkServer(env=dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"))
    yield server
    server.close()
