"""Near-duplicates (note-level content hash, MinHash) and the quality filters, on real MIDI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic

from rwkv_music.pipeline.batch import max_polyphony
from rwkv_music.pipeline.dedup import find_near_duplicates, minhash_signature
from rwkv_music.pipeline.split import note_array, note_content_hash
from rwkv_music.shards import iter_samples, read_manifest, verify_shards

PIECE = "MIDIs_one_track/Maestro_1.mid"


def _reencoded(score: symusic.Score) -> symusic.Score:
    """The same notes written differently: other ticks-per-quarter, tempo, velocities, and split over two tracks."""
    s = score.resample(960)
    s.tempos = [symusic.Tempo(0, 77.0)]
    notes = s.tracks[0].notes.numpy()
    out = symusic.Score(960)
    out.tempos = s.tempos
    out.time_signatures = s.time_signatures
    for part in (0, 1):
        t = symusic.Track(f"part{part}", 0, False)
        sel = slice(part, None, 2)
        t.notes = symusic.Note.from_numpy(notes["time"][sel], notes["duration"][sel], notes["pitch"][sel],
                                          np.full(len(notes["pitch"][sel]), 64, dtype=np.int8))
        out.tracks.append(t)
    return symusic.Score.from_midi(out.dumps_midi())


@pytest.fixture(scope="module")
def score(corpus_dir) -> symusic.Score:
    return symusic.Score(str(corpus_dir / PIECE))


def test_content_hash_sees_through_reencoding_but_not_transposition(score):
    copy = _reencoded(score)
    assert copy.tpq != score.tpq and len(copy.tracks) == 2
    assert note_content_hash(note_array(copy)) == note_content_hash(note_array(score))
    assert note_content_hash(note_array(score.shift_pitch(2))) != note_content_hash(note_array(score))


def test_minhash_finds_close_variants_only(score):
    notes = note_array(score)
    variant = np.delete(notes, np.arange(0, len(notes), 200), axis=0)  # 0.5% of the notes gone
    pieces = [{"source": "a.mid", "content": "h1", "minhash": minhash_signature(notes)},
              {"source": "b.mid", "content": "h2", "minhash": minhash_signature(variant)},
              {"source": "c.mid", "content": "h3", "minhash": minhash_signature(note_array(score.shift_pitch(3)))},
              {"source": "d.mid", "content": "h1", "minhash": minhash_signature(notes)}]
    assert find_near_duplicates(pieces, "content") == {"d.mid": "a.mid"}
    assert find_near_duplicates(pieces, "minhash", 0.8) == {"b.mid": "a.mid", "d.mid": "a.mid"}
    assert find_near_duplicates(pieces, "off") == {}


def test_max_polyphony():
    assert max_polyphony(np.zeros((0, 3), np.int64)) == 0
    # three overlapping notes, then one that starts exactly when the others end
    notes = np.array([[0, 10, 60], [0, 10, 64], [5, 5, 67], [10, 4, 72]], dtype=np.int64)
    assert max_polyphony(notes) == 3


def _synthetic(path: Path, pitches_per_beat: list[list[int]], beats: int) -> None:
    s = symusic.Score(480)
    t = symusic.Track("p", 0, False)
    for b in range(beats):
        for p in pitches_per_beat[b % len(pitches_per_beat)]:
            t.notes.append(symusic.Note(b * 480, 480, p, 80))
    s.tracks.append(t)
    s.dump_midi(str(path))


def test_build_drops_reencoded_copies_and_counts_filters(corpus_dir, build_cli, tmp_path):
    root = tmp_path / "corpus"
    (root / "z").mkdir(parents=True)
    for name in ("Maestro_1", "Maestro_2", "POP909_008", "POP909_010"):
        shutil.copy(corpus_dir / "MIDIs_one_track" / f"{name}.mid", root / f"{name}.mid")
    src = symusic.Score(str(root / "Maestro_1.mid"))
    _reencoded(src).dump_midi(str(root / "z/copy-of-maestro.mid"))
    src.shift_pitch(2).dump_midi(str(root / "z/maestro-up-2.mid"))  # a distinct piece for training
    _synthetic(root / "cluster.mid", [list(range(21, 101))], 40)  # 80 notes at once
    _synthetic(root / "sparse.mid", [[60], [], [], []], 40)  # 10 notes in 10 bars
    out = tmp_path / "out"
    # Batches of 3 files and shards of 300 samples: the near-duplicate's batch is re-cut without it, and the
    # batches' remainders are merged into full shards when the build is published.
    build_cli(root, out, "--workers", "1", "--val-fraction", "0.5", "--min-notes", "16", "--performance-report", "",
              "--files-per-batch", "3", "--samples-per-shard", "300")

    m = read_manifest(out)
    c = m["counts"]
    assert m["near_duplicates"] == [{"source": "z/copy-of-maestro.mid", "same_as": "Maestro_1.mid"}]
    assert c["near_duplicates"] == 1 and c["files_ok"] == 5
    assert c["filtered"]["polyphony-outlier"] == 1 and c["filtered"]["too-few-notes"] == 1
    assert c["files_seen"] == c["files_ok"] + c["files_rejected"] + c["duplicates"] + c["near_duplicates"]
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {"cluster.mid": "polyphony-outlier", "sparse.mid": "too-few-notes"}
    sources: dict[str, set] = {}
    for split in ("train", "val"):
        for fmt in ("parquet", "webdataset"):
            rows = list(iter_samples(out, split, fmt))
            assert len(rows) == c["samples"][split]
            for r in rows:
                sources.setdefault(r["source"], set()).add(split)
    assert "z/copy-of-maestro.mid" not in sources and "z/maestro-up-2.mid" in sources
    assert all(len(v) == 1 for v in sources.values()) and len(sources) == 5
    assert verify_shards(out) == [] and not (out / "performance-report.html").exists()
    assert len(list((out / ".build" / "batches").glob("batch-*.json"))) == 3
    for split in ("train", "val"):
        for fmt in ("parquet", "webdataset"):
            sizes = [e["nsamples"] for e in m["shards"] if e["split"] == split and e["format"] == fmt]
            assert sizes and all(n == 300 for n in sizes[:-1]) and 0 < sizes[-1] <= 300, (split, fmt, sizes)
    published = {p.relative_to(out).as_posix() for d in ("train", "val") for p in (out / d).iterdir()}
    assert published == {e["path"] for e in m["shards"]}  # no leftovers of staging names
