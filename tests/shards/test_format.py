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
    assert parquet_tokenizer_hash(path) == "abc123" and meta[b"rwkv_music.format_version"] == b"2"
    assert pq.read_schema(path).remove_metadata().equals(ARROW_SCHEMA)
    assert pq.read_schema(path).field("tokens").type.value_type == "uint16"
    assert all(r["tokens"].dtype == np.int32 for r in iter_parquet_samples(path))  # what readers always return
    f = pq.ParquetFile(path)
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    if n == 2500:
        assert f.num_row_groups == 2
        assert [as_plain(r) for r in read_parquet_rows(path, [2499, 3, 2048])] == [
            as_plain(samples[i].to_dict()) for i in (2499, 3, 2048)]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]  # no temp files left


@pytest.mark.parametrize("level", [6, None])
def test_webdataset_round_trip(tmp_path, level):
    samples = make_samples(50)
    path = tmp_path / "x.tar.gz"
    write_webdataset(path, samples, level=level)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (level is not None)  # gzip magic
    rows = [as_plain(r) for r in iter_webdataset_samples(path)]
    assert rows == [as_plain(s.to_dict()) for s in samples]
    assert all(r["tokens"].dtype == np.int32 for r in iter_webdataset_samples(path))


def test_webdataset_library_reads_our_tars(tmp_path):
    import webdataset as wds

    samples = make_samples(20)
    write_webdataset(tmp_path / "x.tar.gz", samples)
    got = list(wds.WebDataset(str(tmp_path / "x.tar.gz"), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples, strict=True):
        assert g["tokens.npy"].dtype == np.uint16  # decoded by extension: .npy -> numpy, .json -> dict
        assert np.array_equal(g["tokens.npy"], s.tokens) and g["json"]["ctx_len"] == s.ctx_len


def test_writers_are_byte_deterministic(tmp_path):
    samples = make_samples(300, seed=3)
    for i in (1, 2):
        write_parquet(tmp_path / f"{i}.parquet", samples, "h")
        write_webdataset(tmp_path / f"{i}.tar.gz", samples)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
    assert (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    bad = [make_samples(1)[0], "not a sample"]
    with pytest.raises(AttributeError):
        write_webdataset(tmp_path / "x.tar", bad)
    with pytest.raises(AttributeError):
        write_parquet(tmp_path / "x.parquet", bad, "h")
    assert list(tmp_path.iterdir()) == []


def test_sample_json_fields(tmp_path):
    write_webdataset(tmp_path / "x.tar.gz", make_samples(1))
    import tarfile

    with tarfile.open(tmp_path / "x.tar.gz") as t:
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
        for dtype in ("int32", "uint16"):
            a = (np.arange(n) % 60000).astype(dtype)
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            assert _npy_header(n, dtype) + a.tobytes() == buf.getvalue()
    samples = make_samples(3)
    write_webdataset(tmp_path / "x.tar", samples, level=None)
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
    write_webdataset(tmp_path / "x.tar.gz", samples)
    with tarfile.open(tmp_path / "x.tar.gz") as t:
        got = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".json")]
    want = [json.dumps({f: getattr(s, f) for f in (*INT_FIELDS, *STR_FIELDS)}, sort_keys=True).encode()
            for s in samples]
    assert got == want


def test_tokens_that_do_not_fit_uint16_are_refused_or_stored_as_int32(tmp_path):
    big = [Sample(np.array([1, 70000, 3], dtype=np.int32), 1, 2, 1, "0" * 64, "x.mid", 0, 0)]
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_parquet(tmp_path / "x.parquet", big, "h")
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_webdataset(tmp_path / "x.tar.gz", big)
    assert list(tmp_path.iterdir()) == []
    write_parquet(tmp_path / "x.parquet", big, "h", token_dtype="int32")
    write_webdataset(tmp_path / "x.tar.gz", big, "int32")
    for rows in (iter_parquet_samples(tmp_path / "x.parquet"), iter_webdataset_samples(tmp_path / "x.tar.gz")):
        assert [r["tokens"].tolist() for r in rows] == [[1, 70000, 3]]
    from rwkv_music.shards.schema import token_dtype_for

    assert token_dtype_for(65536) == "uint16" and token_dtype_for(65537) == "int32"


# ---------------------------------------------------------------- format version 1 (int32 tokens, plain .tar)

def _write_v1_parquet(path, samples, tokenizer_hash):
    """A shard as format version 1 wrote it: list<int32> tokens, format_version "1" in the schema metadata."""
    import pyarrow as pa

    schema = pa.schema([pa.field("tokens", pa.list_(pa.int32()), nullable=False),
                        *(f for f in ARROW_SCHEMA if f.name != "tokens")])
    cols = {f.name: [getattr(s, f.name) for s in samples] for f in schema if f.name != "tokens"}
    cols["tokens"] = [np.asarray(s.tokens, dtype=np.int32).tolist() for s in samples]
    meta = {b"rwkv_music.tokenizer_hash": tokenizer_hash.encode(), b"rwkv_music.format_version": b"1"}
    table = pa.table({f.name: cols[f.name] for f in schema}, schema=schema.with_metadata(meta))
    pq.write_table(table, path, compression="zstd")


def _write_v1_tar(path, samples):
    """A shard as format version 1 wrote it: an uncompressed tar of <key>.tokens.npy (int32) and <key>.json."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for s in samples:
            buf = io.BytesIO()
            np.save(buf, np.asarray(s.tokens, dtype=np.int32), allow_pickle=False)
            fields = {f: getattr(s, f) for f in ("completion_len", "ctx_len", "first_bar", "meta_len", "piece_id",
                                                 "source", "window")}
            for name, data in ((f"{s.key}.tokens.npy", buf.getvalue()),
                               (f"{s.key}.json", json.dumps(fields, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_readers_accept_format_version_1_shards(tmp_path):
    samples = make_samples(40, seed=5)
    _write_v1_parquet(tmp_path / "old.parquet", samples, "h1")
    _write_v1_tar(tmp_path / "old.tar", samples)
    want = [as_plain(s.to_dict()) for s in samples]
    for rows in (iter_parquet_samples(tmp_path / "old.parquet"), iter_webdataset_samples(tmp_path / "old.tar")):
        rows = list(rows)
        assert [as_plain(r) for r in rows] == want
        assert all(r["tokens"].dtype == np.int32 for r in rows)
    assert [as_plain(r) for r in read_parquet_rows(tmp_path / "old.parquet", [3, 1])] == [want[3], want[1]]
    # and a version-1 build directory as a whole (manifest format_version 1, .tar shards)
    from rwkv_music.shards import iter_samples

    (tmp_path / "train").mkdir()
    (tmp_path / "old.parquet").rename(tmp_path / "train/part-000000-00.parquet")
    (tmp_path / "old.tar").rename(tmp_path / "train/part-000000-00.tar")
    entries = [{"path": f"train/part-000000-00{ext}", "split": "train", "format": fmt, "nsamples": len(samples)}
               for fmt, ext in (("parquet", ".parquet"), ("webdataset", ".tar"))]
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": entries,
                                                        "args": {"formats": ["parquet", "webdataset"]}}))
    for fmt in ("parquet", "webdataset"):
        assert [as_plain(r) for r in iter_samples(tmp_path, "train", fmt)] == want


def test_reader_refuses_an_unknown_format_version(tmp_path):
    write_parquet(tmp_path / "x.parquet", make_samples(3), "h")
    table = pq.read_table(tmp_path / "x.parquet")
    meta = {**table.schema.metadata, b"rwkv_music.format_version": b"99"}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "future.parquet")
    with pytest.raises(ValueError, match="format version 99"):
        list(iter_parquet_samples(tmp_path / "future.parquet"))


def test_reader_takes_tars_written_by_other_tools_and_names_truncation(tmp_path):
    """Our fast member walk hands anything unusual (pax headers, long names, gzip via tarfile) to tarfile."""
    import gzip
    import io
    import tarfile

    samples = make_samples(4, seed=9)
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as t:
        for s in samples:
            buf = io.BytesIO()
            np.save(buf, np.asarray(s.tokens, dtype=np.uint16), allow_pickle=False)
            meta = json.dumps({f: getattr(s, f) for f in ("completion_len", "ctx_len", "first_bar", "meta_len",
                                                          "piece_id", "source", "window")}).encode()
            for ext, data in (("tokens.npy", buf.getvalue()), ("json", meta)):
                info = tarfile.TarInfo(f"{'deep/' * 30}{s.key}.{ext}")  # > 100 bytes: a pax header
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    assert [as_plain(r) for r in iter_webdataset_samples(path)] == [as_plain(s.to_dict()) for s in samples]

    write_webdataset(tmp_path / "x.tar.gz", make_samples(30))
    raw = gzip.decompress((tmp_path / "x.tar.gz").read_bytes())
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_webdataset_samples(tmp_path / "cut.tar"))
