"""Hostile input: mutated copies of real MIDI files and filesystem oddities, built together with valid files.

Every valid file must yield samples, every file must be accounted for (samples, a duplicate record, or a
reject with a reason), and the build must finish with exit code 0.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from rwkv_music.shards import iter_samples, read_manifest, verify_shards

VALID = ["MIDIs_one_track/POP909_008.mid", "MIDIs_one_track/POP909_010.mid", "MIDIs_one_track/POP909_022.mid",
         "MIDIs_one_track/Maestro_3.mid", "MIDIs_multitrack/Funkytown.mid"]
SEED_FILES = ["MIDIs_one_track/POP909_191.mid", "MIDIs_multitrack/Aicha.mid"]  # mutated, never added as-is


def _header(fmt: int, ntracks: int, division: int) -> bytes:
    return b"MThd" + struct.pack(">IHHh", 6, fmt, ntracks, division)


def _track(events: bytes) -> bytes:
    return b"MTrk" + struct.pack(">I", len(events) + 4) + events + b"\x00\xff\x2f\x00"


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def _notes(n: int, step: int = 240) -> bytes:
    ev = b""
    for i in range(n):
        ev += b"\x00\x90" + bytes([60 + i % 12, 80]) + _vlq(step) + b"\x80" + bytes([60 + i % 12, 0])
    return ev


def mutations(data: bytes, rng: random.Random) -> dict[str, bytes]:
    """Named corruptions of one real file's bytes."""
    flips = bytearray(data)
    for i in rng.sample(range(14, len(data)), 40):
        flips[i] ^= 1 << rng.randrange(8)
    first_track = data.index(b"MTrk")
    junk = b"JUNK" + struct.pack(">I", 64) + bytes(rng.randrange(256) for _ in range(64))
    bogus_track = b"MTrk" + struct.pack(">I", 100) + bytes(rng.randrange(256) for _ in range(100))
    return {
        "truncated-half": data[: len(data) // 2],
        "truncated-header": data[:10],
        "header-only": data[:14],
        "byte-flips": bytes(flips),
        "inserted-junk-chunk": data[:first_track] + junk + data[first_track:],
        "inserted-bogus-track": data[:first_track] + bogus_track + data[first_track:],
        "absurd-ntracks": data[:10] + struct.pack(">H", 65535) + data[12:],
        "absurd-format": data[:8] + struct.pack(">H", 7) + data[10:],
        "zero-tpq": data[:12] + b"\x00\x00" + data[14:],
        "smpte-division": data[:12] + struct.pack(">h", -(25 << 8) + 40) + data[14:],
        "chunk-length-overflow": data[:first_track + 4] + b"\xff\xff\xff\xff" + data[first_track + 8:],
        "random-bytes": bytes(rng.randrange(256) for _ in range(2000)),
    }


def crafted() -> dict[str, bytes]:
    """Hand-made files: huge delta times, type 2, no notes, note-ons without note-offs."""
    return {
        "huge-delta.mid": _header(0, 1, 480) + _track(b"\x00\x90\x3c\x50" + _vlq(0x0FFFFFFF) + b"\x80\x3c\x00"),
        "huge-delta-then-music.mid": _header(0, 1, 480) + _track(_notes(200) + _vlq(0x0FFFFFFF) + b"\x90\x3c\x50"
                                                                  + _vlq(240) + b"\x80\x3c\x00"),
        "type-2.mid": _header(2, 2, 480) + _track(_notes(300)) + _track(_notes(300, 120)),
        "no-notes.mid": _header(1, 1, 480) + _track(b"\x00\xff\x51\x03\x07\xa1\x20"),
        "only-note-ons.mid": _header(0, 1, 480) + _track(b"".join(b"\x60\x90" + bytes([40 + i % 40, 90])
                                                                   for i in range(500))),
    }


@pytest.fixture(scope="module")
def fuzz_corpus(corpus_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "corpus"
    (root / "valid").mkdir(parents=True)
    (root / "bad").mkdir()
    for rel in VALID:
        shutil.copy(corpus_dir / rel, root / "valid" / Path(rel).name)
    rng = random.Random(1234)
    for i, rel in enumerate(SEED_FILES):
        for name, data in mutations((corpus_dir / rel).read_bytes(), rng).items():
            (root / "bad" / f"{name}-{i}.mid").write_bytes(data)
    for name, data in crafted().items():
        (root / "bad" / name).write_bytes(data)
    (root / "bad" / "zero-bytes.mid").write_bytes(b"")
    with open(root / "bad" / "zeros-100MB.mid", "wb") as f:
        f.truncate(100 << 20)  # 100 MB of zero bytes (sparse on disk)
    (root / "bad" / "directory.mid").mkdir()
    os.symlink("loop-b.mid", root / "bad" / "loop-a.mid")
    os.symlink("loop-a.mid", root / "bad" / "loop-b.mid")
    os.symlink(".", root / "bad" / "dir-loop.mid")
    os.symlink("does-not-exist.mid", root / "bad" / "dangling.mid")
    try:
        with open(bytes(root / "bad") + b"/latin1-\xe9.mid", "wb") as f:
            f.write((corpus_dir / VALID[0]).read_bytes())
    except OSError:
        pass  # a file system that refuses non-UTF-8 names: nothing to test there
    return root


# Files that can never become samples: each must be a reject (with a reason), never silently skipped.
MUST_REJECT = ("truncated-header", "header-only", "zero-tpq", "random-bytes", "huge-delta.mid",
               "huge-delta-then-music.mid", "no-notes.mid", "zero-bytes.mid", "zeros-100MB.mid", "directory.mid",
               "loop-a.mid", "loop-b.mid", "dir-loop.mid", "dangling.mid", "latin1-")


def test_fuzzed_corpus_builds_and_accounts_for_every_file(fuzz_corpus: Path, build_cli, tmp_path):
    out = tmp_path / "out"
    proc = build_cli(fuzz_corpus, out, "--workers", "2", "--files-per-batch", "8", "--val-fraction", "0.3",
                     "--near-dedup", "minhash", "--performance-report", "")
    assert proc.returncode == 0
    m = read_manifest(out)
    c = m["counts"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert all(r["reason"] and r["message"] for r in rejects)
    rejected = {r["path"]: r["reason"] for r in rejects}
    assert len(rejected) == len(rejects) == c["files_rejected"]
    with_samples = {r["source"] for split in ("train", "val") for r in iter_samples(out, split)}
    dups = {d["source"] for d in m["duplicates"] + m["near_duplicates"]}

    names = [n.decode("utf-8", "backslashreplace") for n in os.listdir(bytes(fuzz_corpus / "bad"))]
    listed = [f"valid/{Path(v).name}" for v in VALID] + [f"bad/{n}" for n in names]
    assert c["files_seen"] == len(listed) == c["files_ok"] + c["files_rejected"] + c["duplicates"] + \
        c["near_duplicates"]
    for rel in listed:
        n_places = (rel in rejected) + (rel in with_samples) + (rel in dups)
        assert n_places == 1, f"{rel}: rejected={rejected.get(rel)}, samples={rel in with_samples}, dup={rel in dups}"
    for v in VALID:
        assert f"valid/{Path(v).name}" in with_samples
    for rel in listed:
        if rel.split("/", 1)[1].startswith(MUST_REJECT):
            assert rel in rejected or rel in dups, rel  # a duplicate of another rejected file is fine
    assert verify_shards(out) == []


_SCAN_AS_CHILD = """
import json, sys
from pathlib import Path
from rwkv_music.pipeline.scan import find_midi, scan_corpus
root = Path(sys.argv[1])
scan = scan_corpus(root, find_midi(root))
print(json.dumps({"unique": [f.rel for f in scan.unique],
                  "rejects": [[r.path, r.reason] for r in scan.rejects]}))
"""


def test_unreadable_file_is_a_read_error(corpus_dir, tmp_path):
    """chmod 000. Root reads such a file anyway, so as root the scan runs in a child process without the
    capabilities that bypass file permissions (util-linux's setpriv drops them from its bounding set)."""
    import subprocess
    import sys

    (tmp_path / "ok.mid").write_bytes((corpus_dir / VALID[0]).read_bytes())
    locked = tmp_path / "locked.mid"
    locked.write_bytes((corpus_dir / VALID[1]).read_bytes())
    locked.chmod(0)
    cmd = [sys.executable, "-c", _SCAN_AS_CHILD, str(tmp_path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without util-linux's setpriv: permissions do not stop reads")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["unique"] == ["ok.mid"]
        assert got["rejects"] == [["locked.mid", "read-error"]]
    finally:
        locked.chmod(0o644)
