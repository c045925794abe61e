"""The per-batch worker and the scan, in-process (no Dask): rejects, duplicates, meter mapping, shard files."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic

from rwkv_music.pipeline.batch import BatchSettings, BatchTask, batch_record_path, load_finished, process_batch
from rwkv_music.pipeline.scan import CorpusError, CorpusFile, corpus_mix, find_midi, make_batches, scan_corpus
from rwkv_music.remi.tokenizer import build_tokenizer, save_tokenizer, tokenizer_hash
from rwkv_music.remi.windows import WindowSpec
from rwkv_music.shards import iter_parquet_samples, iter_samples, iter_webdataset_samples, parquet_tokenizer_hash


@pytest.fixture(scope="module")
def small_corpus(corpus_dir: Path, tmp_path_factory) -> Path:
    """Real files plus the awkward cases: a byte-identical copy, a 0-byte file, a 2-bar excerpt, an 11/16 piece,
    an upper-case suffix, and a non-MIDI file that must be ignored."""
    root = tmp_path_factory.mktemp("small-corpus")
    (root / "a").mkdir()
    (root / "b" / "deep").mkdir(parents=True)
    shutil.copy(corpus_dir / "MIDIs_one_track/POP909_008.mid", root / "a/pop.mid")
    shutil.copy(corpus_dir / "MIDIs_one_track/POP909_008.mid", root / "b/deep/pop-copy.mid")
    shutil.copy(corpus_dir / "MIDIs_multitrack/Funkytown.mid", root / "b/FUNK.MIDI")
    shutil.copy(corpus_dir / "MIDIs_corrupted/ValueError_Control168.mid", root / "a/corrupt.mid")
    shutil.copy(corpus_dir / "MIDIs_one_track/empty.mid", root / "a/empty-track.mid")
    (root / "a/zero.mid").write_bytes(b"")
    (root / "a/notes.txt").write_text("not midi")
    score = symusic.Score(str(corpus_dir / "MIDIs_one_track/Maestro_1.mid"))
    short = score.clip(0, score.tpq * 4 * 2, clip_end=True)
    short.dump_midi(str(root / "a/short.mid"))
    odd = symusic.Score(str(corpus_dir / "MIDIs_one_track/POP909_010.mid"))
    odd.time_signatures = [symusic.TimeSignature(0, 11, 16)]
    odd.dump_midi(str(root / "b/eleven-sixteen.mid"))
    return root


def test_find_midi_is_sorted_recursive_and_case_insensitive(small_corpus):
    rels = find_midi(small_corpus)
    assert rels == sorted(rels)
    assert "b/FUNK.MIDI" in rels and "b/deep/pop-copy.mid" in rels and "a/notes.txt" not in rels
    assert len(rels) == 8


def test_scan_keeps_first_of_duplicates(small_corpus):
    scan = scan_corpus(small_corpus, find_midi(small_corpus))
    assert scan.seen == 8
    assert scan.duplicates == [{"source": "b/deep/pop-copy.mid", "same_as": "a/pop.mid"}]
    assert [f.rel for f in scan.unique] == sorted(f.rel for f in scan.unique)
    assert len(scan.unique) == 7
    batches = make_batches(scan.unique, 3)
    assert [len(b.files) for b in batches] == [3, 3, 1] and [b.index for b in batches] == [0, 1, 2]


@pytest.mark.parametrize("bad", ["missing", "empty", "no-midi"])
def test_find_midi_rejects_unusable_corpus(tmp_path, bad):
    corpus = tmp_path / "c"
    if bad != "missing":
        corpus.mkdir()
    if bad == "no-midi":
        (corpus / "readme.txt").write_text("x")
    with pytest.raises(CorpusError):
        find_midi(corpus)


def test_process_batch_writes_shards_and_records_rejects(small_corpus, tmp_path):
    tok = build_tokenizer()
    thash = tokenizer_hash(tok)
    save_tokenizer(tok, tmp_path / "out/tokenizer.json")
    scan = scan_corpus(small_corpus, find_midi(small_corpus))
    (batch,) = make_batches(scan.unique, 16)
    settings = BatchSettings(corpus=str(small_corpus), out=str(tmp_path / "out"),
                             tokenizer_path=str(tmp_path / "out/tokenizer.json"), tokenizer_hash=thash,
                             spec=WindowSpec(), formats=("parquet", "webdataset"), samples_per_shard=100,
                             val_fraction=0.5, seed=0)
    result = process_batch(BatchTask(batch=batch, settings=settings))

    reasons = {r.path: r.reason for r in result.rejects}
    assert reasons == {"a/corrupt.mid": "parse-error", "a/empty-track.mid": "no-pitched-tracks",
                       "a/zero.mid": "empty-file", "a/short.mid": "too-short"}
    c = result.counts
    assert c.files == 7 and c.ok == 3 and c.rejected == 4 and c.too_short == 1
    assert result.timesig_changed == [{"source": "b/eleven-sixteen.mid", "changed": 1}]
    assert c.windows == c.samples_train + c.samples_val + c.windows_dropped
    samples = {"train": c.samples_train, "val": c.samples_val}

    by_path = {s["path"]: s for s in result.shards}
    for split in ("train", "val"):
        pq = sorted(p for p, s in by_path.items() if s["split"] == split and s["format"] == "parquet")
        assert sum(by_path[p]["nsamples"] for p in pq) == samples[split]
        assert all(by_path[p]["nsamples"] <= 100 for p in pq)
        for p in pq:
            assert p.startswith(f".build/staging/{split}/part-000000-")
            rows = list(iter_parquet_samples(tmp_path / "out" / p))
            tar_rows = list(iter_webdataset_samples(tmp_path / "out" / p.replace(".parquet", ".tar.gz")))
            assert len(rows) == len(tar_rows) == by_path[p]["nsamples"]
            assert parquet_tokenizer_hash(tmp_path / "out" / p) == thash
    # one piece never straddles the splits
    pieces = {}
    for s in result.shards:
        if s["format"] == "parquet":
            for row in iter_parquet_samples(tmp_path / "out" / s["path"]):
                pieces.setdefault(row["piece_id"], set()).add(s["split"])
    assert len(pieces) == 3 and all(len(v) == 1 for v in pieces.values())

    # the batch is recognised as finished, and no longer once one of its shards is gone
    record = json.loads(batch_record_path(tmp_path / "out", 0).read_text())
    assert record["digest"] == batch.digest()
    # the record's JSON keeps its plain layout (the typed counts and rejects become objects with these keys)
    assert list(record["counts"]) == ["files", "ok", "rejected", "too_short", "windows", "windows_dropped",
                                      "windows_truncated", "samples_train", "samples_val", "tokens_train",
                                      "tokens_val", "tokens_encoded"]
    assert all(list(r) == ["path", "reason", "message"] for r in record["rejects"])
    assert load_finished(tmp_path / "out", batch) == result
    (tmp_path / "out" / result.shards[0]["path"]).unlink()
    assert load_finished(tmp_path / "out", batch) is None


def test_process_batch_is_deterministic(small_corpus, tmp_path):
    tok = build_tokenizer()
    thash = tokenizer_hash(tok)
    save_tokenizer(tok, tmp_path / "tok.json")
    scan = scan_corpus(small_corpus, find_midi(small_corpus))
    batch = make_batches(scan.unique, 4)[1]
    results = []
    for name in ("x", "y"):
        settings = BatchSettings(corpus=str(small_corpus), out=str(tmp_path / name),
                                 tokenizer_path=str(tmp_path / "tok.json"), tokenizer_hash=thash,
                                 spec=WindowSpec(context_bars=2, completion_bars=1, max_seq_len=512),
                                 formats=("parquet", "webdataset"), samples_per_shard=64, val_fraction=0.3, seed=7)
        results.append(process_batch(BatchTask(batch=batch, settings=settings)))
    a, b = ([(s["path"], s["sha256"]) for s in r.shards] for r in results)
    assert a == b and a
    assert all(p.startswith((".build/staging/train/part-000001-", ".build/staging/val/part-000001-")) for p, _ in a)


def test_scan_rejects_non_utf8_file_names(tmp_path, corpus_dir):
    data = (corpus_dir / "MIDIs_one_track/POP909_022.mid").read_bytes()
    (tmp_path / "ok.mid").write_bytes(data)
    try:
        with open(bytes(tmp_path) + b"/bad\xff.mid", "wb") as f:
            f.write(data[:-1] + b"\x00")
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    scan = scan_corpus(tmp_path, find_midi(tmp_path))
    assert [f.rel for f in scan.unique] == ["ok.mid"]
    assert [r.reason for r in scan.rejects] == ["bad-filename"]
    json.dumps([r.to_json() for r in scan.rejects])  # recordable in rejects.jsonl


@pytest.mark.parametrize("max_seq_len", [2048, 300])
def test_span_arrays_equal_the_window_token_lists(corpus_dir, max_seq_len):
    """The pipeline's array slicing gives exactly each window's tokens (also when context bars were truncated)."""
    from rwkv_music.pipeline.batch import span_arrays
    from rwkv_music.remi.tokenizer import encode_piano, load_piano_score
    from rwkv_music.remi.windows import Vocab, WindowStats, index_bars, make_windows, window_spans

    tok = build_tokenizer()
    vocab = Vocab(tok)
    for rel in ("MIDIs_one_track/Maestro_1.mid", "MIDIs_one_track/6354774_Macabre Waltz.mid"):
        ids = encode_piano(load_piano_score(corpus_dir / rel, tok), tok)
        spec = WindowSpec(max_seq_len=max_seq_len)
        stats, span_stats = WindowStats(), WindowStats()
        windows = make_windows(ids, vocab, spec, stats)
        arr = np.array(ids, dtype=np.int32)
        spans = window_spans(index_bars(ids, vocab), spec, span_stats)
        arrays = span_arrays(arr, spans)
        assert len(arrays) == len(windows) > 0 and span_stats == stats
        for w, s, a in zip(windows, spans, arrays, strict=True):
            assert a.dtype == np.int32 and a.tolist() == list(w.tokens)
            assert (s.meta_len, s.ctx_len, s.completion_len, s.window, s.first_bar) == \
                (w.meta_len, w.ctx_len, w.completion_len, w.window, w.first_bar)
    assert max_seq_len == 2048 or stats.truncated > 0


def test_batches_mix_the_corpus_by_content_not_path(built_shards: Path):
    """Batches take the files in an order drawn from the seed and their bytes, so shards (cut from batches in
    batch order) do not follow the corpus's folders: the test build's pieces do not come in path order, and the
    order survives renaming the files."""
    files = [CorpusFile(f"{name}.mid", 1, f"{i:064x}") for i, name in enumerate("abcdefghijklmnopqrstuvwxyz")]
    mixed = corpus_mix(files, seed=0)
    assert sorted(f.rel for f in mixed) == sorted(f.rel for f in files) and mixed != files
    renamed = corpus_mix([CorpusFile(f"z/{f.rel}", f.size, f.sha256) for f in reversed(files)], seed=0)
    assert [f.sha256 for f in renamed] == [f.sha256 for f in mixed]
    assert [f.sha256 for f in corpus_mix(files, seed=1)] != [f.sha256 for f in mixed]
    pieces = list(dict.fromkeys(s["source"] for s in iter_samples(built_shards, "train")))  # first appearances
    assert len(pieces) > 10 and pieces != sorted(pieces)
    folders = [p.split("/")[0] for p in pieces]
    assert sum(a != b for a, b in itertools.pairwise(folders)) > 2  # the folders interleave
