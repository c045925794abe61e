"""`musicprep build-shards` end to end on the real test corpus (the session build plus one more)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rwkv_music.pipeline.cli import main
from rwkv_music.shards import iter_samples, iter_shard, read_manifest, verify_shards


def test_counts_add_up(built_shards: Path):
    m = read_manifest(built_shards)
    c = m["counts"]
    assert c["files_seen"] == 30
    assert c["files_seen"] == c["files_ok"] + c["files_rejected"] + c["duplicates"]
    assert c["files_ok"] == 28
    assert c["windows"] == c["samples"]["train"] + c["samples"]["val"] + c["windows_dropped"]
    assert c["samples"]["train"] > 0 and c["samples"]["val"] > 0
    for split in ("train", "val"):
        for fmt in ("parquet", "webdataset"):
            entries = [s for s in m["shards"] if s["split"] == split and s["format"] == fmt]
            assert len(entries) >= 2
            assert sum(e["nsamples"] for e in entries) == c["samples"][split]
            # every shard but the last of its split and format holds exactly --samples-per-shard samples
            assert all(e["nsamples"] == 256 for e in entries[:-1]) and 0 < entries[-1]["nsamples"] <= 256
        rows = list(iter_samples(built_shards, split))
        assert len(rows) == c["samples"][split]
        assert sum(len(r["tokens"]) for r in rows) == c["tokens"][split]
    assert m["tokenizer"]["hash"] and (built_shards / "tokenizer.json").is_file()
    assert m["args"]["context_bars"] == 4 and m["args"]["completion_bars"] == 2


def test_rejects_hold_the_corrupt_and_the_empty_file(built_shards: Path):
    lines = (built_shards / "rejects.jsonl").read_text().splitlines()
    rejects = {r["path"]: r for r in map(json.loads, lines)}
    assert set(rejects) == {"MIDIs_corrupted/ValueError_Control168.mid", "MIDIs_one_track/empty.mid"}
    assert all(r["reason"] and r["message"] for r in rejects.values())
    assert len(lines) == read_manifest(built_shards)["counts"]["files_rejected"]


def test_manifest_hashes_match_files(built_shards: Path):
    assert verify_shards(built_shards) == []
    listed = {e["path"] for e in read_manifest(built_shards)["shards"]}
    on_disk = {p.relative_to(built_shards).as_posix() for p in built_shards.glob("*/*")
               if p.name.endswith((".parquet", ".tar.gz"))}
    assert listed == on_disk


def test_both_formats_hold_the_same_samples(built_shards: Path):
    for split in ("train", "val"):
        pq = iter_samples(built_shards, split, "parquet")
        wd = iter_samples(built_shards, split, "webdataset")
        n = 0
        for a, b in zip(pq, wd, strict=True):
            assert a["tokens"].tolist() == b["tokens"].tolist()
            assert {k: v for k, v in a.items() if k != "tokens"} == {k: v for k, v in b.items() if k != "tokens"}
            n += 1
        assert n > 0


def test_published_order_keeps_each_pieces_windows_in_order(built_shards: Path):
    """Batch remainders are merged after the batches' full shards, yet every sample is there once and each
    piece's windows still come in window order."""
    staged: list[tuple[str, int]] = []
    for rec in sorted((built_shards / ".build" / "batches").glob("batch-*.json")):
        for s in json.loads(rec.read_text())["shards"]:
            if s["split"] == "train" and s["format"] == "parquet":
                staged += [(r["piece_id"], r["window"]) for r in iter_shard(built_shards / s["path"], "parquet")]
    final = [(r["piece_id"], r["window"]) for r in iter_samples(built_shards, "train")]
    assert sorted(final) == sorted(staged) and len(set(final)) == len(final)
    last: dict[str, int] = {}
    for piece, window in final:
        assert window > last.get(piece, -1)
        last[piece] = window


def test_samples_are_well_formed_and_pieces_stay_in_one_split(built_shards: Path):
    split_of: dict[str, str] = {}
    for split in ("train", "val"):
        for r in iter_samples(built_shards, split):
            t = r["tokens"]
            assert r["meta_len"] == 2 and r["meta_len"] <= r["ctx_len"] <= len(t) <= 2048
            assert r["ctx_len"] + r["completion_len"] == len(t) and r["completion_len"] > 0
            assert split_of.setdefault(r["piece_id"], split) == split
            assert not r["source"].startswith("/") and r["source"].endswith(".mid")


def test_rebuild_is_byte_identical_with_other_worker_count_and_resumes(built_shards: Path, built_shards_args,
                                                                         corpus_dir, build_cli, tmp_path):
    """A second build (1 worker instead of 2) gives the same shard bytes; rerunning it reuses every batch."""
    out = tmp_path / "again"
    args = list(built_shards_args)
    args[args.index("--workers") + 1] = "1"
    build_cli(corpus_dir, out, *args)
    first = {(e["path"], e["sha256"], e["bytes"]) for e in read_manifest(built_shards)["shards"]}
    second = {(e["path"], e["sha256"], e["bytes"]) for e in read_manifest(out)["shards"]}
    assert first == second
    for path, _, _ in first:
        assert (built_shards / path).read_bytes() == (out / path).read_bytes()

    # In-process from here on: neither run starts a cluster.
    cli = [*map(str, ("build-shards", corpus_dir, "-o", out, "--dashboard-address", "", "--no-progress")), *args]
    again = CliRunner().invoke(main, cli)  # same configuration: every batch is already finished
    assert again.exit_code == 0 and "2 of 2 batch(es) already finished" in again.output
    assert {(e["path"], e["sha256"]) for e in read_manifest(out)["shards"]} == {(p, h) for p, h, _ in first}

    other = CliRunner().invoke(main, [*cli, "--stride-bars", "2"])
    assert other.exit_code == 2 and "--overwrite" in other.output and "stride_bars" in other.output
    assert verify_shards(out) == []  # refused: nothing touched


@pytest.mark.parametrize("case", ["missing", "empty", "no-midi"])
def test_unusable_corpus_exits_2_and_writes_nothing(tmp_path, case):
    corpus = tmp_path / "corpus"
    if case != "missing":
        corpus.mkdir()
    if case == "no-midi":
        (corpus / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["build-shards", str(corpus), "-o", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Error" in res.output
    assert not out.exists()


def test_refuses_foreign_out_dir(tmp_path, corpus_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["build-shards", str(corpus_dir), "-o", str(out), "--no-progress"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize(("content", "says"), [
    ('{"not_a_param": 1}', "unknown tokenizer parameter(s): not_a_param"),
    ("{broken json", "is not readable JSON"),
    ('{"num_velocities": "many"}', "num_velocities must be an integer, not 'many'"),
    ('{"num_velocities": true}', "num_velocities must be an integer, not True"),
    # miditok would take any non-empty string as true ("no" too): refused, not silently misread
    ('{"use_tempos": "yes"}', "use_tempos must be true or false, not 'yes'"),
    # miditok itself fails on these with whatever its code meets first (AttributeError, TypeError)
    ('{"beat_res": 5}', "tokenizer parameter beat_res = 5 is not valid: AttributeError"),
    ('{"pitch_range": 5}', "tokenizer parameter pitch_range = 5 is not valid: TypeError"),
    ('{"num_velocities": 16, "special_tokens": 3}', "tokenizer parameter special_tokens = 3 is not valid"),
    # the key to blame is the one without which the rest builds, not the first that fails over the defaults
    ('{"use_tempos": false, "num_tempos": 0, "beat_res": 5}', "tokenizer parameter beat_res = 5 is not valid"),
    ('{"pitch_intervals_max_time_dist": "far"}', "pitch_intervals_max_time_dist must be a number, not 'far'"),
    ('\xff\xfe{', "cannot be read")])
def test_bad_tokenizer_config_exits_2_names_file_and_key_and_writes_nothing(tmp_path, corpus_dir, content, says):
    cfg = tmp_path / "tok.json"
    cfg.write_bytes(content.encode("latin-1") if content.startswith("\xff") else content.encode())
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["build-shards", str(corpus_dir), "-o", str(out), "--tokenizer-config", str(cfg),
                                    "--no-progress", "--bar-phase", "4"])
    assert res.exit_code == 2 and res.exception.__class__ is SystemExit, res.output
    [line] = [x for x in res.output.splitlines() if x.strip()]
    assert line.startswith(f"Error: {cfg}") and says in line, line
    assert not out.exists()


def test_stats_and_batch_records(built_shards: Path):
    stats = json.loads((built_shards / "stats.json").read_text())
    n_batches = len(list((built_shards / ".build" / "batches").glob("batch-*.json")))
    assert stats["batches"] == {"total": n_batches, "ran": n_batches, "reused": 0} and n_batches == 2
    assert {"read", "parse", "tokenize", "window", "write"} <= set(stats["worker_seconds"])
    assert sum(b["files"] for b in stats["per_batch"]) == 30
    workers = stats["workers"]  # the fixture build's 2 worker processes (normally one batch each)
    assert workers["processes"] in (1, 2) and 0 < workers["busy_share"] <= 1
    assert sum(w["batches"] for w in workers["per_process"]) == n_batches
    for w in workers["per_process"]:
        assert 0 < w["first_start_s"] <= w["last_end_s"] <= stats["wall_seconds"]["total"]
        # busy_s, first_start_s and last_end_s are each rounded to the millisecond on their own, so the busy
        # time and the span between first start and last end can disagree by up to 1.5 ms
        assert 0 < w["busy_s"] <= w["last_end_s"] - w["first_start_s"] + 2e-3


def test_overwrite_replaces_only_the_builds_own_files(tmp_path):
    from rwkv_music.pipeline.build import BUILD_CONFIG, BuildError, _prepare_out

    out = tmp_path / "out"
    _prepare_out(out, {"seed": 0}, overwrite=False)  # fresh OUT
    (out / "train").mkdir()
    (out / "train" / "part-000000-00.parquet").write_bytes(b"old")
    (out / "train" / ".part-000001-00.parquet.x.tmp").write_bytes(b"half")
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    _prepare_out(out, {"seed": 0}, overwrite=False)  # same configuration: kept, interrupted writes cleaned
    assert (out / "train" / "part-000000-00.parquet").exists()
    assert not (out / "train" / ".part-000001-00.parquet.x.tmp").exists()
    with pytest.raises(BuildError, match="seed"):
        _prepare_out(out, {"seed": 1}, overwrite=False)
    assert (out / "train" / "part-000000-00.parquet").exists()
    _prepare_out(out, {"seed": 1}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".build", "notes.txt"]
    assert json.loads((out / BUILD_CONFIG).read_text()) == {"seed": 1}
