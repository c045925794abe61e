"""Fixtures shared by the trainer tests (test_fit*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fit_testutil import SMALL_BUILD_ARGS


@pytest.fixture
def one_thread():
    """In-process training/evaluation on one thread (the 2-core CI machine is shared with subprocesses)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_shards(corpus_dir: Path, build_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real build of the test corpus with short windows (so CPU training is quick); treat it as read-only."""
    out = tmp_path_factory.mktemp("train-shards") / "out"
    build_cli(corpus_dir, out, *SMALL_BUILD_ARGS)
    return out
