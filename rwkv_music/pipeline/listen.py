"""`musicprep sample`: decode random samples back to MIDI so a person can listen to what the model learns from."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from rwkv_music.atomic import atomic_path, write_json_atomic
from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import Vocab, decode_window

from ..shards.manifest import TOKENIZER, available_format, iter_shard, read_manifest, shard_entries, unreadable_shard
from ..shards.parquet import read_parquet_rows


def pick_samples(out: str | os.PathLike, n: int, split: str, seed: int) -> list[dict]:
    """`n` distinct samples drawn uniformly from a split (fewer if the split is smaller), in draw order."""
    out = Path(out)
    m = read_manifest(out)
    fmt = available_format(m)
    entries = shard_entries(m, split, fmt)
    total = sum(e["nsamples"] for e in entries)
    if total == 0:
        raise ValueError(f"{out}: the {split} split has no samples")
    picks = random.Random(seed).sample(range(total), min(n, total))
    where: dict[int, list[tuple[int, int]]] = {}  # shard -> [(row in shard, draw order)]
    base = 0
    bounds = []
    for e in entries:
        bounds.append((base, base + e["nsamples"]))
        base += e["nsamples"]
    for order, g in enumerate(picks):
        s = next(i for i, (lo, hi) in enumerate(bounds) if lo <= g < hi)
        where.setdefault(s, []).append((g - bounds[s][0], order))
    got: dict[int, dict] = {}
    for s, rows in where.items():
        path = out / entries[s]["path"]
        try:
            if fmt == "parquet":
                for (_, order), row in zip(rows, read_parquet_rows(path, [r for r, _ in rows]), strict=True):
                    got[order] = row
            else:
                wanted = dict(rows)
                for i, row in enumerate(iter_shard(path, fmt)):
                    if i in wanted:
                        got[wanted[i]] = row
        except Exception as e:  # pyarrow, tarfile, gzip, a missing file: whatever the damage, name the shard
            raise ValueError(unreadable_shard(path, e)) from e
    return [got[i] for i in range(len(picks))]


def completion_meta(tokens: list[int], meta_len: int, ctx_len: int, vocab: Vocab) -> list[int]:
    """The window's meta as it stands where the completion starts: TimeSig and Tempo updated by the context (a
    BarPhase token, if any, is kept: it only labels the window)."""
    timesig, tempo = tokens[0], tokens[1]
    for t in tokens[meta_len:ctx_len]:
        if t in vocab.timesig_ids:
            timesig = t
        elif t in vocab.tempo_ids:
            tempo = t
    return [timesig, tempo, *tokens[2:meta_len]]


def _dump(score, path: Path) -> None:
    with atomic_path(path) as tmp:
        score.dump_midi(str(tmp))


def write_random_samples(out: str | os.PathLike, dest: str | os.PathLike, n: int, split: str = "train",
                         seed: int = 0) -> list[str]:
    """Write `<i>-<source>-w<window>-{context,completion,full}.mid` per sample and an index.json; returns lines
    describing what was written."""
    out, dest = Path(out), Path(dest)
    tok = tokenizer_from_file(out / TOKENIZER)
    vocab = Vocab(tok)
    index, lines = [], []
    for i, s in enumerate(pick_samples(out, n, split, seed)):
        tokens = [int(t) for t in s["tokens"]]
        meta_len, ctx_len = s["meta_len"], s["ctx_len"]
        stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(s["source"]).stem).strip("_")[:40]
        base = f"{i:02d}-{stem}-w{s['window']:04d}"
        files = {}
        if ctx_len > meta_len:
            files["context"] = decode_window(tokens[:ctx_len], meta_len, tok, vocab)
        files["completion"] = decode_window(completion_meta(tokens, meta_len, ctx_len, vocab) + tokens[ctx_len:],
                                            meta_len, tok, vocab)
        files["full"] = decode_window(tokens, meta_len, tok, vocab)
        names = {}
        for part, score in files.items():
            names[part] = f"{base}-{part}.mid"
            _dump(score, dest / names[part])
        index.append({"source": s["source"], "piece_id": s["piece_id"], "window": s["window"],
                      "first_bar": s["first_bar"], "tokens": len(tokens), "ctx_len": ctx_len,
                      "completion_len": s["completion_len"], "files": names})
        lines.append(f"{dest / names['full']}  ({s['source']}, window {s['window']}, bar {s['first_bar']}, "
                     f"{ctx_len} context + {s['completion_len']} completion tokens)")
    write_json_atomic(dest / "index.json", index)
    return lines
