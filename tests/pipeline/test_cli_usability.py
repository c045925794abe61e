"""What a new user meets first: --version, help on every option, exit codes, and the modes of the files written."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rwkv_music.pipeline.cli import main


def _musicprep(*args: str, umask: int | None = None, **kw) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "rwkv_music.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec, **kw)


def test_version_is_the_installed_distributions():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"musicprep {importlib.metadata.version('rwkv-music')}"


def test_every_option_has_a_help_line():
    missing = [f"{name} {'/'.join(p.opts)}" for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []
    for name in main.commands:  # and --help shows them
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Options:" in res.output


@pytest.mark.parametrize("args", [["build-shards"], ["build-shards", ".", "-o", "x", "--no-such-option"],
                                  ["build-shards", ".", "-o", "x", "--format", "csv"],
                                  ["sample", ".", "-n", "0", "-o", "x"], ["no-such-command"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--file-timeout", "nan"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--val-fraction", "nan"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--scheduler", "no-port-given"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--bar-phase", "65"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--dashboard-address", "no-port"],
                                  ["build-shards", "CORPUS", "-o", "OUT", "--files-per-batch", "0"]])
def test_usage_errors_exit_2(args, corpus_dir: Path, tmp_path: Path):
    args = [{"CORPUS": str(corpus_dir / "MIDIs_one_track"), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception


def test_a_scheduler_file_without_a_scheduler_fails_at_once(corpus_dir: Path, tmp_path: Path):
    """Dask would wait for a missing scheduler file to appear, for ever: refused up front, nothing written."""
    corpus, out = corpus_dir / "MIDIs_one_track", tmp_path / "out"
    missing = tmp_path / "scheduler.json"
    res = CliRunner().invoke(main, ["build-shards", str(corpus), "-o", str(out), "--scheduler-file", str(missing)])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"--scheduler-file {missing} does not exist: start the scheduler first" in lines[0]
    for text in ("{cut", '{"type": "Scheduler"}', "[1]"):  # Dask would fail with UnboundLocalError on these
        missing.write_text(text)
        res = CliRunner().invoke(main, ["build-shards", str(corpus), "-o", str(out), "--scheduler-file", str(missing)])
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and "is not a Dask scheduler file" in lines[0], res.output
    assert not out.exists()
    # a file naming a scheduler that is gone: Dask's connect timeout bounds the wait (shortened here)
    missing.write_text('{"address": "tcp://127.0.0.1:9"}')
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    proc = _musicprep("build-shards", str(corpus), "-o", str(out), "--scheduler-file", str(missing), "--no-progress",
                      env=env)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot connect to the Dask scheduler of {missing}" in errors[0]


def test_a_build_where_every_file_is_rejected_exits_1_naming_reason_and_rejects(tmp_path: Path, build_cli):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.mid").write_text("these are not MIDI bytes, just a text file renamed\n")
    (corpus / "also-notes.mid").write_text("another text file\n")
    out = tmp_path / "out"
    proc = build_cli(corpus, out, "--workers", "1", "--performance-report", "", check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "parse-error 2" in errors[0] and str(out / "rejects.jsonl") in errors[0]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rejects) == ["also-notes.mid", "notes.mid"]
    assert {r["reason"] for r in rejects} == {"parse-error"}
    assert not (out / "manifest.json").exists()  # not a finished build that training could pick up
    assert proc.stdout == ""


def test_outputs_get_the_umask_mode(corpus_dir: Path, tmp_path: Path):
    """Under umask 022 every file of a build, its sampled MIDI and its staging area is 0644, every folder 0755."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("POP909_008", "Maestro_3", "POP909_010"):
        shutil.copy(corpus_dir / "MIDIs_one_track" / f"{name}.mid", corpus / f"{name}.mid")
    shutil.copy(corpus_dir / "MIDIs_one_track" / "POP909_008.mid", corpus / "copy.mid")  # a duplicate
    out, listen = tmp_path / "out", tmp_path / "listen"
    build = _musicprep("build-shards", str(corpus), "-o", str(out), "--dashboard-address", "", "--no-progress",
                       "--workers", "1", "--val-fraction", "0.5", "--samples-per-shard", "64", umask=0o022)
    assert build.returncode == 0, build.stderr
    sample = _musicprep("sample", str(out), "-n", "2", "-o", str(listen), umask=0o022)
    assert sample.returncode == 0, sample.stderr
    modes = {}
    for root in (out, listen):
        for p in [root, *root.rglob("*")]:
            modes[p.relative_to(tmp_path).as_posix()] = (p.is_dir(), stat.S_IMODE(p.lstat().st_mode))
    wrong = {p: oct(m) for p, (d, m) in modes.items() if m != (0o755 if d else 0o644)}
    assert wrong == {}
    names = {Path(p).name for p in modes}
    assert {"manifest.json", "rejects.jsonl", "stats.json", "tokenizer.json", "performance-report.html",
            "index.json"} <= names
    assert any(n.endswith(".parquet") for n in names) and any(n.endswith("-full.mid") for n in names)
