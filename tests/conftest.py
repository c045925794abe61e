"""Session fixtures shared by all test packages: the real MIDI test corpus and one real shard build of it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "miditok-tests"  # miditok's test MIDI files (MIT, see its LICENSE)

# The fixture build: both formats, several shards per split, 2 Dask workers, default bars (4 + 2, stride 1,
# max 2048 tokens). val-fraction 0.2 so the 28 usable pieces give a non-empty validation split.
FIXTURE_BUILD_ARGS = ("--format", "both", "--samples-per-shard", "256", "--workers", "2", "--val-fraction", "0.2",
                      "--seed", "0")


def run_build(corpus: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """`musicprep build-shards` in a real subprocess (its own Dask LocalCluster, no dashboard, no progress bar)."""
    cmd = [sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(corpus), "-o", str(out),
           "--dashboard-address", "", "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"build-shards failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], object]:
    """Import a script of bench/ by name (``bench_module("sampling_sweep")``); its path is the module's __file__."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The real MIDI test corpus (30 files incl. one corrupt and one empty), or skip."""
    if not CORPUS.is_dir():
        pytest.skip(f"test corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def build_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `musicprep build-shards CORPUS -o OUT *extra` in a subprocess (see run_build)."""
    return run_build


@pytest.fixture(scope="session")
def built_shards_args() -> tuple[str, ...]:
    """The extra build-shards arguments `built_shards` was built with."""
    return FIXTURE_BUILD_ARGS


@pytest.fixture(scope="session")
def built_shards(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of one finished build of the test corpus (FIXTURE_BUILD_ARGS); treat it as read-only."""
    out = tmp_path_factory.mktemp("built-shards") / "out"
    run_build(corpus_dir, out, *FIXTURE_BUILD_ARGS)
    return out
