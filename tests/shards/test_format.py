"""Shard writers and readers: round trip, deterministic bytes, schema metadata, webdataset compatibility."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rwkv_music.shards import (
    ARROW_SCHEMA,
    Sample,
    iter_parquet_samples,
    iter_webdataset_samples,
    parquet_tokenizer_hash,
    read_parquet_rows,
    write_parquet,
    write_webdataset,
)


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(5, 300))
        ctx = int(rng.integers(2, length))
        out.append(Sample(tokens=rng.integers(0, 500, length).astype(np.int32), meta_len=2, ctx_len=ctx,
                          completion_len=length - ctx, piece_id=f"{i // 7:064x}", source=f"dir/piece é {i // 7}.mid",
                          window=i % 7, first_bar=i % 7 + 1))
    return out


def as_plain(row: dict) -> dict:
    return {**row, "tokens": np.asarray(row["tokens"]).tolist()}


@pytest.mark.parametrize("n", [0, 1, 2500])
def test_parquet_round_trip_and_metadata(tmp_path, n):
    samples = make_samples(n)
    path = tmp_path / "x.parquet"
    write_parquet(path, samples, "abc123")
    rows = [as_plain(r) for r in iter_parquet_samples(path)]
    assert rows == [as_plain(s.to_dict()) for s in samples]
    meta = pq.read_schema(path).metadata
    assert parquet_tokenizer_hash(path) == "abc123" and meta[b"rwkv_music.format_version"] == b"1"
    assert pq.read_schema(path).remove_metadata().equals(ARROW_SCHEMA)
    f = pq.ParquetFile(path)
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    if n == 2500:
        assert f.num_row_groups == 2
        assert [as_plain(r) for r in read_parquet_rows(path, [2499, 3, 2048])] == [
            as_plain(samples[i].to_dict()) for i in (2499, 3, 2048)]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]  # no temp files left


def test_webdataset_round_trip(tmp_path):
    samples = make_samples(50)
    path = tmp_path / "x.tar"
    write_webdataset(path, samples)
    rows = [as_plain(r) for r in iter_webdataset_samples(path)]
    assert rows == [as_plain(s.to_dict()) for s in samples]
    assert all(r["tokens"].dtype == np.int32 for r in iter_webdataset_samples(path))


def test_webdataset_library_reads_our_tars(tmp_path):
    import webdataset as wds

    samples = make_samples(20)
    write_webdataset(tmp_path / "x.tar", samples)
    got = list(wds.WebDataset(str(tmp_path / "x.tar"), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples, strict=True):
        assert np.array_equal(g["tokens.npy"], s.tokens) and g["json"]["ctx_len"] == s.ctx_len


def test_writers_are_byte_deterministic(tmp_path):
    samples = make_samples(300, seed=3)
    for i in (1, 2):
        write_parquet(tmp_path / f"{i}.parquet", samples, "h")
        write_webdataset(tmp_path / f"{i}.tar", samples)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    bad = [make_samples(1)[0], "not a sample"]
    with pytest.raises(AttributeError):
        write_webdataset(tmp_path / "x.tar", bad)
    with pytest.raises(AttributeError):
        write_parquet(tmp_path / "x.parquet", bad, "h")
    assert list(tmp_path.iterdir()) == []


def test_sample_json_fields(tmp_path):
    write_webdataset(tmp_path / "x.tar", make_samples(1))
    import tarfile

    with tarfile.open(tmp_path / "x.tar") as t:
        names = t.getnames()
        fields = json.loads(t.extractfile(names[1]).read())
    assert names[0].endswith(".tokens.npy") and names[1].endswith(".json")
    assert set(fields) == {"meta_len", "ctx_len", "completion_len", "piece_id", "source", "window", "first_bar"}


def test_tar_members_are_standard_ustar_and_npy(tmp_path):
    """The hand-assembled tar and .npy bytes are what tarfile and np.save produce/accept."""
    import io
    import tarfile

    from rwkv_music.shards.webdataset import _npy_header

    for n in (0, 1, 7, 1000, 123456):
        a = np.arange(n, dtype=np.int32) - 3
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        assert _npy_header(n) + a.tobytes() == buf.getvalue()
    samples = make_samples(3)
    write_webdataset(tmp_path / "x.tar", samples)
    assert (tmp_path / "x.tar").stat().st_size % (20 * 512) == 0
    with tarfile.open(tmp_path / "x.tar") as t:
        members = t.getmembers()
        assert [m.name for m in members] == [f"{s.key}.{ext}" for s in samples for ext in ("tokens.npy", "json")]
        assert all(m.isfile() and m.mode == 0o644 and m.mtime == 0 and m.uid == 0 for m in members)
        arr = np.load(io.BytesIO(t.extractfile(members[0]).read()), allow_pickle=False)
    assert arr.tolist() == np.asarray(samples[0].tokens).tolist()


def test_sample_json_is_json_dumps_for_any_source_name(tmp_path):
    """The hand-formatted member JSON equals json.dumps(sort_keys=True), also for names that need escaping."""
    import tarfile

    from rwkv_music.shards.schema import INT_FIELDS, STR_FIELDS, Sample

    names = ['plain.mid', 'quote"and\\backslash.mid', "tab\tnew\nline.mid", "Dvořák/Humoresque ♪.mid",
             "surrogate-\udcff.mid"]
    samples = [Sample(np.arange(5, dtype=np.int32), 1, 3, 2, f"{i:064x}", n, i, 7 * i) for i, n in enumerate(names)]
    write_webdataset(tmp_path / "x.tar", samples)
    with tarfile.open(tmp_path / "x.tar") as t:
        got = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".json")]
    want = [json.dumps({f: getattr(s, f) for f in (*INT_FIELDS, *STR_FIELDS)}, sort_keys=True).encode()
            for s in samples]
    assert got == want
