"""`musicprep inspect` and `musicprep sample` on the session build."""

from __future__ import annotations

import json
from collections import Counter

import symusic
from click.testing import CliRunner

from rwkv_music.pipeline.cli import main
from rwkv_music.pipeline.inspect import split_lengths
from rwkv_music.shards import iter_samples, read_manifest


def test_inspect_reports_counts_lengths_and_verifies(built_shards):
    res = CliRunner().invoke(main, ["inspect", str(built_shards), "--verify"])
    assert res.exit_code == 0, res.output
    c = read_manifest(built_shards)["counts"]
    assert f"{c['samples']['train']} samples" in res.output and f"{c['samples']['val']} samples" in res.output
    assert "all shard sha256s match" in res.output and "parse-error 1" in res.output
    lens = split_lengths(built_shards, "val")
    rows = list(iter_samples(built_shards, "val"))
    assert lens["length"].tolist() == [len(r["tokens"]) for r in rows]
    assert lens["ctx_len"].tolist() == [r["ctx_len"] for r in rows]


def test_inspect_reports_bytes_per_token_and_webdataset_stays_within_3x_parquet(built_shards):
    res = CliRunner().invoke(main, ["inspect", str(built_shards)])
    assert res.exit_code == 0, res.output
    m = read_manifest(built_shards)
    tokens = sum(m["counts"]["tokens"].values())
    per_token = {fmt: sum(e["bytes"] for e in m["shards"] if e["format"] == fmt) / tokens
                 for fmt in ("parquet", "webdataset")}
    for fmt, bpt in per_token.items():
        assert f"{fmt:<10} all   {bpt:>7.3f} bytes/token (tokens stored as uint16)" in res.output
    ratio = per_token["webdataset"] / per_token["parquet"]
    assert f"webdataset / parquet bytes: {ratio:.2f}" in res.output
    assert ratio <= 3, res.output
    assert m["token_dtype"] == "uint16" and m["format_version"] == 2


def test_inspect_rejects_a_non_build(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "manifest.json" in res.output
    for text, says in (("{cut short", "not readable JSON"), ("[1, 2]", "not a build manifest")):
        (tmp_path / "manifest.json").write_text(text)
        res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
        assert res.exit_code == 2 and says in res.output and res.exception.__class__ is SystemExit, res.output


def test_a_damaged_shard_is_named_and_the_rest_still_reported(built_shards, tmp_path):
    """One cut-short train shard: inspect names it on stderr, counts the other shards, exits 1; sample says it."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built_shards, out)
    m = read_manifest(out)
    entries = [e for e in m["shards"] if e["split"] == "train" and e["format"] == "parquet"]
    bad = out / entries[0]["path"]
    bad.write_bytes(bad.read_bytes()[:10000])
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 1 and res.exception.__class__ is SystemExit, res.output
    [err] = res.stderr.splitlines()
    assert err.startswith(f"Error: cannot read shard {bad}: ArrowInvalid: "), err
    kept = m["counts"]["samples"]["train"] - entries[0]["nsamples"]
    assert f"train: {kept} samples (tokens per sample); 1 damaged shard(s) left out" in res.stdout
    assert f"val: {m['counts']['samples']['val']} samples (tokens per sample)\n" in res.stdout
    assert "rejects: " in res.stdout  # the report went on to its end
    res = CliRunner().invoke(main, ["inspect", str(out), "--verify"])
    assert res.exit_code == 1 and f"{entries[0]['path']}: 10000 bytes" in res.stdout
    # `sample` drawing from that shard: one line naming it, nothing written
    res = CliRunner().invoke(main, ["sample", str(out), "-n", "200", "-o", str(tmp_path / "listen")])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: cannot read shard {bad}: "), lines
    assert not (tmp_path / "listen").exists()


def test_sample_decodes_context_completion_and_full(built_shards, tmp_path):
    dest = tmp_path / "listen"
    res = CliRunner().invoke(main, ["sample", str(built_shards), "-n", "3", "-o", str(dest), "--seed", "5"])
    assert res.exit_code == 0, res.output
    index = json.loads((dest / "index.json").read_text())
    assert len(index) == 3
    for item in index:
        scores = {part: symusic.Score(str(dest / name)) for part, name in item["files"].items()}
        assert set(scores) == {"context", "completion", "full"}

        def pitches(s):
            return Counter(n.pitch for t in s.tracks for n in t.notes)

        assert pitches(scores["full"]) == pitches(scores["context"]) + pitches(scores["completion"])
        assert sum(pitches(scores["completion"]).values()) > 0
    again = tmp_path / "again"
    CliRunner().invoke(main, ["sample", str(built_shards), "-n", "3", "-o", str(again), "--seed", "5"])
    assert json.loads((again / "index.json").read_text()) == index  # same seed, same samples
