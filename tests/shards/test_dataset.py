"""The streaming training dataset on a real shard build: mask, partition, determinism, resume, bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rwkv_music.shards import iter_samples, read_parquet_rows, write_parquet
from rwkv_music.shards.dataset import (
    DataError,
    DataSpec,
    collate,
    iter_eval_batches,
    make_stream,
    open_split,
    plan_epoch,
)
from rwkv_music.shards.schema import Sample


def _rows(batch: dict) -> list[bytes]:
    """The unpadded input rows of a batch (identity of its samples, independent of padding width)."""
    out = []
    for inp, m in zip(batch["input_ids"], batch["mask"], strict=True):
        last = int(torch.nonzero(m)[-1]) + 1  # the mask ends at len-2, the last real input position
        out.append(inp[:last].numpy().tobytes())
    return out


def _epoch(stream, epoch: int = 0, consumed: int = 0, workers: int = 0) -> list[dict]:
    stream.set_position(epoch, consumed)
    if workers:
        return list(DataLoader(stream, batch_size=None, num_workers=workers))
    return list(stream)


def test_collate_masks_exactly_the_completion(built_shards: Path):
    samples = []
    for s in iter_samples(built_shards, "train"):
        samples.append(s)
        if len(samples) == 6:
            break
    b = collate(samples, pad_id=0)
    T = max(len(s["tokens"]) for s in samples) - 1
    assert b["input_ids"].shape == b["mask"].shape == (6, T)
    expected = np.concatenate([s["tokens"][s["ctx_len"]:] for s in samples])
    assert b["targets"].tolist() == expected.tolist()
    assert b["n_targets"] == int(b["mask"].sum()) == sum(s["completion_len"] for s in samples)
    assert b["flat_index"].tolist() == [i for i, m in enumerate(b["mask"].flatten().tolist()) if m]
    for i, s in enumerate(samples):
        L = len(s["tokens"])
        assert b["input_ids"][i, : L - 1].tolist() == s["tokens"][:-1].tolist()
        row = b["mask"][i]
        assert row[s["ctx_len"] - 1 : L - 1].all() and not row[: s["ctx_len"] - 1].any() and not row[L - 1 :].any()
        # the masked inputs predict the completion: the token after position p is tokens[p + 1]
        p = s["ctx_len"] - 1
        assert s["tokens"][p + 1] == s["tokens"][s["ctx_len"]]


def test_collate_rejects_inconsistent_sample():
    with pytest.raises(ValueError, match="bad sample"):
        collate([{"tokens": np.arange(10), "ctx_len": 4, "completion_len": 3}])


@pytest.mark.parametrize("n_slots", [1, 2, 3, 8, 40])
def test_plan_epoch_partitions_every_sample_once(n_slots: int):
    counts = [256] * 18 + [55, 128, 256, 7]
    offsets = np.cumsum([0, *counts])
    for epoch in (0, 1):
        plans = plan_epoch(counts, n_slots, seed=3, epoch=epoch)
        seen = []
        for p in plans:
            mine = [g for si in p.shards for g in range(offsets[si], offsets[si + 1])]
            kept = [g for i, g in enumerate(mine) if i % p.stride == p.offset]
            assert len(kept) == p.nsamples
            seen += kept
        assert sorted(seen) == list(range(sum(counts)))
        # never more than 5% lost to equalising the slots
        assert sum(counts) - n_slots * min(p.nsamples for p in plans) <= 0.05 * sum(counts) + n_slots
    assert plan_epoch(counts, 4, 3, 0) != plan_epoch(counts, 4, 3, 1)


@pytest.fixture(scope="module")
def train_set(built_shards: Path):
    return open_split(built_shards, "train")


def test_epoch_is_deterministic_and_reshuffled(train_set):
    spec = DataSpec(batch_size=8, seed=1, shuffle_buffer=64, bucket_pool=4)
    s = make_stream(train_set, spec)
    e0 = _epoch(s, 0)
    assert len(e0) == s.batches_per_epoch(0) == train_set.nsamples // 8
    # each sample at most once (as a multiset: some windows repeat verbatim in real music)
    used = Counter(r for b in e0 for r in _rows(b))
    available = Counter(np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes()
                        for s in iter_samples(train_set.root, "train"))
    assert not used - available
    assert sum(used.values()) == 8 * len(e0)
    assert [_rows(b) for b in _epoch(make_stream(train_set, spec), 0)] == [_rows(b) for b in e0]
    e1 = _epoch(s, 1)
    assert [_rows(b) for b in e1] != [_rows(b) for b in e0]
    # length bucketing: batches are far less padded than random ones
    pad = sum(int((b["input_ids"].shape[1] * 8) - b["n_tokens"]) for b in e0)
    nobucket = _epoch(make_stream(train_set, DataSpec(batch_size=8, seed=1, shuffle_buffer=64, bucket_pool=1)), 0)
    pad_nb = sum(int((b["input_ids"].shape[1] * 8) - b["n_tokens"]) for b in nobucket)
    assert pad < 0.5 * pad_nb


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_unseen_batches(train_set, workers: int):
    spec = DataSpec(batch_size=16, seed=5, num_workers=workers, shuffle_buffer=128)
    s = make_stream(train_set, spec)
    full = [_rows(b) for b in _epoch(s, 0, 0, workers)]
    assert len(full) == s.batches_per_epoch(0)
    for k in (1, 7, len(full) - 1):
        rest = [_rows(b) for b in _epoch(s, 0, k, workers)]
        assert rest == full[k:], f"resume at {k}"


def test_ranks_get_equal_batches_and_streams_stand_in_for_ranks(train_set):
    ranks = [make_stream(train_set, DataSpec(batch_size=4, seed=2, world_size=2, rank=r, shuffle_buffer=32))
             for r in range(2)]
    per_rank = [_epoch(s, 0) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    one = make_stream(train_set, DataSpec(batch_size=8, seed=2, streams=2, shuffle_buffer=32))
    joined = _epoch(one, 0)
    assert len(joined) == len(per_rank[0])
    for t, b in enumerate(joined):
        assert _rows(b) == _rows(per_rank[0][t]) + _rows(per_rank[1][t])
    # the ranks' data together use each sample at most once
    available = Counter(np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes()
                        for s in iter_samples(train_set.root, "train"))
    assert not Counter(r for rank in per_rank for b in rank for r in _rows(b)) - available
    three = [make_stream(train_set, DataSpec(batch_size=4, seed=2, world_size=3, rank=r)) for r in range(3)]
    assert len({s.batches_per_epoch(0) for s in three}) == 1


def test_batches_mix_pieces_from_across_the_shards(train_set):
    """A shard holds each piece's windows together, so each of the test build's shards holds a few of the 20
    training pieces. Read shard after shard, a batch of 16 holds about two pieces; with every shard open at once
    it holds about as many as a batch drawn at random from the whole split would."""
    piece = {}
    for s in iter_samples(train_set.root, "train"):
        piece.setdefault(np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes(), s["source"])
    share = np.array(list(Counter(piece.values()).values())) / len(piece)
    at_random = float(np.sum(1 - (1 - share) ** 16))  # expected distinct pieces among 16 random windows

    def pieces_per_batch(mix: int) -> float:
        spec = DataSpec(batch_size=16, seed=0, shuffle_buffer=64, bucket_pool=1, mix_shards=mix)
        return float(np.mean([len({piece[r] for r in _rows(b)}) for b in _epoch(make_stream(train_set, spec), 0)]))

    in_turn, mixed = pieces_per_batch(1), pieces_per_batch(len(train_set.shards))
    assert in_turn < 3 < 0.85 * at_random < mixed


def test_mixed_shards_still_split_the_data_when_slots_outnumber_shards(train_set):
    """With more slots than shards every slot reads every shard and keeps every n-th sample: which ones must not
    depend on how the shards are interleaved."""
    assert train_set.shards and len(train_set.shards) < 32
    spec = DataSpec(batch_size=32, seed=0, streams=32, shuffle_buffer=8, mix_shards=8)
    plan = make_stream(train_set, spec).plans(0)[0]
    assert plan.stride == 32
    used = Counter(r for b in _epoch(make_stream(train_set, spec), 0) for r in _rows(b))
    available = Counter(np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes()
                        for s in iter_samples(train_set.root, "train"))
    assert not used - available
    assert sum(used.values()) >= 0.95 * train_set.nsamples


def test_webdataset_stream_equals_parquet(built_shards: Path):
    spec = DataSpec(batch_size=8, seed=0, shuffle_buffer=32)
    pq = _epoch(make_stream(open_split(built_shards, "train", "parquet"), spec), 0)
    wd = _epoch(make_stream(open_split(built_shards, "train", "webdataset"), spec), 0)
    assert [_rows(b) for b in pq] == [_rows(b) for b in wd]


def test_eval_batches_cover_val_split_once(built_shards: Path):
    val = open_split(built_shards, "val")
    n = sum(b["input_ids"].shape[0] for b in iter_eval_batches(val, 7))
    assert n == val.nsamples
    split = [sum(b["n_targets"] for b in iter_eval_batches(val, 7, rank=r, world_size=2)) for r in range(2)]
    assert sum(split) == sum(b["n_targets"] for b in iter_eval_batches(val, 7))


def test_a_limited_evaluation_samples_the_whole_val_split(built_shards: Path):
    """--eval-batches N takes windows spread evenly over the split, so the N batches span its pieces (a val shard
    holds each piece's windows together: the first N batches would be one or two pieces), and DDP ranks take
    disjoint ones."""
    val = open_split(built_shards, "val")
    piece, order = {}, []
    for s in iter_samples(built_shards, "val"):
        key = np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes()
        piece.setdefault(key, s["source"])
        order.append(s["source"])
    assert len(set(order[:16])) <= 2 < len(set(order))
    counts = Counter(order)
    taken = [r for b in iter_eval_batches(val, 8, max_batches=2) for r in _rows(b)]
    # evenly spaced: every piece holding at least N / 16 windows (they lie together) gives one
    assert len(taken) == 16 and {piece[r] for r in taken} >= {p for p, c in counts.items() if 16 * c >= len(order)}
    assert len({piece[r] for r in taken}) > 4
    ranks = [[r for b in iter_eval_batches(val, 4, rank=k, world_size=2, max_batches=2) for r in _rows(b)]
             for k in range(2)]
    assert [len(r) for r in ranks] == [8, 8] and sorted(ranks[0] + ranks[1]) == sorted(taken)
    # asking for more than half the split still reaches its end (a whole-number stride would stop at the middle)
    n_batches = (7 * val.nsamples // 10) // 8
    taken = [r for b in iter_eval_batches(val, 8, max_batches=n_batches) for r in _rows(b)]
    assert len(taken) == 8 * n_batches and {piece[r] for r in taken} == set(counts)
    position = {key: i for i, key in enumerate(np.asarray(s["tokens"][:-1], dtype=np.int64).tobytes()
                                               for s in iter_samples(built_shards, "val"))}
    assert max(position[r] for r in taken) >= val.nsamples - 2


def test_bad_shard_directories_give_clear_errors(built_shards: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        open_split(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest"):
        open_split(tmp_path / "empty", "train")
    bad = tmp_path / "copy"
    shutil.copytree(built_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    first = next(e for e in m["shards"] if e["split"] == "train" and e["format"] == "parquet")
    with pytest.raises(DataError, match="checkpoint uses"):
        open_split(bad, "train", expect_hash="0" * 64)
    # a shard rewritten with another tokenizer's hash
    rows = read_parquet_rows(bad / first["path"], range(first["nsamples"]))
    write_parquet(bad / first["path"], [Sample(**r) for r in rows], tokenizer_hash="f" * 64)
    with pytest.raises(DataError, match="different tokenizers"):
        open_split(bad, "train")
    # garbage bytes
    (bad / first["path"]).write_bytes(b"not a parquet file" * 10)
    with pytest.raises(DataError, match="cannot read shard"):
        open_split(bad, "train")
    (bad / first["path"]).unlink()
    with pytest.raises(DataError, match="missing"):
        open_split(bad, "train")


def test_truncated_shard_fails_while_streaming_with_the_path(built_shards: Path, tmp_path: Path):
    bad = tmp_path / "trunc"
    shutil.copytree(built_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    tars = [e for e in m["shards"] if e["split"] == "train" and e["format"] == "webdataset"]
    for e in tars:  # cut every tar in half: the stream hits one whichever the permutation
        p = bad / e["path"]
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    s = make_stream(open_split(bad, "train", "webdataset"), DataSpec(batch_size=4, shuffle_buffer=8))
    with pytest.raises(DataError, match=r"cannot read shard .*\.tar"):
        _epoch(s, 0)


def test_packed_epoch_rows_windows_and_resume(train_set):
    spec = DataSpec(batch_size=1, batch_tokens=2 * 2048, pack_len=2048, seed=3, shuffle_buffer=64)
    s = make_stream(train_set, spec)
    epoch = _epoch(s, 0)
    assert len(epoch) == s.batches_per_epoch(0) > 0
    available = Counter(np.asarray(x["tokens"][:-1], dtype=np.int64).tobytes()
                        for x in iter_samples(train_set.root, "train"))
    used: Counter = Counter()
    fill = []
    for b in epoch:
        assert b["input_ids"].shape == b["mask"].shape == b["starts"].shape == (2, 2048)
        assert int(b["mask"].sum()) == b["targets"].numel() == b["n_targets"]
        assert torch.equal(b["flat_index"], b["mask"].flatten().nonzero().flatten())
        # every row starts with a window; the mask never covers a window's first position
        assert b["starts"][:, 0].all() and not (b["mask"] & b["starts"]).any()
        fill.append(b["n_tokens"] / b["input_ids"].numel())
        used.update(_window_bytes(b))
    assert not used - available  # whole windows, each used at most as often as it exists
    assert sum(fill) / len(fill) > 0.95  # best-fit packing: almost no padding
    assert [_rows(b) for b in _epoch(s, 0, 3)] == [_rows(b) for b in epoch[3:]]
    with pytest.raises(ValueError, match="batch_tokens"):
        DataSpec(batch_size=1, batch_tokens=100, pack_len=512)


def _window_bytes(batch: dict) -> list[bytes]:
    """Each window's input tokens (its first position to the next start or to the end of its targets)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        st = torch.nonzero(batch["starts"][r]).flatten().tolist()
        last = int(torch.nonzero(batch["mask"][r]).flatten().max()) + 1
        for lo, hi in zip(st, [*st[1:], last], strict=True):
            out.append(batch["input_ids"][r, lo:hi].numpy().astype(np.int64).tobytes())
    return out


def test_packed_ranks_get_equal_batches_of_their_own_windows(train_set):
    """Packed batches under DDP: the same number of batches on every rank, from disjoint shards."""
    specs = [DataSpec(batch_size=1, batch_tokens=2 * 2048, pack_len=2048, seed=4, world_size=2, rank=r,
                      shuffle_buffer=32) for r in range(2)]
    streams = [make_stream(train_set, sp) for sp in specs]
    epochs = [_epoch(s, 0) for s in streams]
    assert len(epochs[0]) == len(epochs[1]) == streams[0].batches_per_epoch(0) > 0
    plans = streams[0].plans(0)
    mine = [set(plans[specs[r].slot(0, 0)].shards) for r in range(2)]
    if plans[0].stride == 1:  # whole shards per slot: the ranks read different shards
        assert not mine[0] & mine[1]


@pytest.mark.parametrize("packed", [False, True])
def test_transposed_stream_moves_each_window_by_one_shift_and_resumes(train_set, packed: bool):
    """Key augmentation changes only pitch ids, one shift per window within +-N, reproducibly and on resume."""
    from rwkv_music.remi.tokenizer import tokenizer_from_file
    from rwkv_music.remi.transpose import PitchShift
    from rwkv_music.shards import TOKENIZER

    vocab = tokenizer_from_file(train_set.root / TOKENIZER).vocab
    pitch_of = np.full(len(vocab), -1)
    for t, i in vocab.items():
        if t.startswith("Pitch_"):
            pitch_of[i] = int(t.split("_")[1])
    shape = {"batch_tokens": 2 * 2048, "batch_size": 1} if packed else {"batch_size": 8}
    plain = make_stream(train_set, DataSpec(seed=2, shuffle_buffer=64, **shape))
    spec = DataSpec(seed=2, shuffle_buffer=64, transpose=4, **shape)
    moved = make_stream(train_set, spec, PitchShift(vocab))
    a, b = _epoch(plain, 0), _epoch(moved, 0)
    assert len(a) == len(b) > 3
    shifts = Counter()
    for x, y in zip(a, b, strict=True):
        for key in ("mask", "starts") if packed else ("mask",):
            assert torch.equal(x[key], y[key])  # the same windows in the same places
        xi, yi = x["input_ids"].numpy(), y["input_ids"].numpy()
        is_pitch = pitch_of[xi] >= 0
        assert np.array_equal(xi[~is_pitch], yi[~is_pitch])  # only pitch ids change
        windows = x["starts"].cumsum(1).numpy() if packed else np.zeros_like(xi)  # window number within its row
        windows = windows + np.arange(xi.shape[0])[:, None] * xi.shape[1]  # ... and its row
        k = pitch_of[yi] - pitch_of[xi]
        for w in np.unique(windows[is_pitch]):
            ks = set(k[is_pitch & (windows == w)].tolist())
            assert len(ks) == 1 and all(-4 <= s <= 4 for s in ks)
            shifts.update(ks)
    assert len(shifts) == 9 and shifts[0] < 0.3 * sum(shifts.values())  # every shift used, most windows moved
    assert [_rows(x) for x in _epoch(make_stream(train_set, spec, PitchShift(vocab)), 0)] == [_rows(x) for x in b]
    assert [_rows(x) for x in _epoch(moved, 0, 2)] == [_rows(x) for x in b[2:]]
    with pytest.raises(ValueError, match="pitch_shift"):
        make_stream(train_set, spec)
    with pytest.raises(ValueError, match=r"0\.\.24"):
        DataSpec(batch_size=8, transpose=25)


def _window_tokens(batch: dict, w: int) -> np.ndarray:
    """Window `w`'s whole token sequence, read back from the batch: its inputs from its start, then its last target."""
    T = batch["input_ids"].shape[1]
    flat = batch["flat_index"][batch["target_window"] == w]
    row, last = divmod(int(flat[-1]), T)
    first = int(flat[0]) % T
    begin = int(torch.nonzero(batch["starts"][row, : first + 1]).flatten()[-1]) if "starts" in batch else 0
    tail = batch["targets"][batch["target_window"] == w][-1:]
    return np.concatenate([batch["input_ids"][row, begin : last + 1].numpy(), tail.numpy()]).astype(np.int64)


@pytest.mark.parametrize("packed", [False, True])
def test_repeat_pairs_put_each_windows_replay_beside_it_and_leave_the_data_alone(train_set, packed: bool):
    """fit --repeat-contrast's batches: every true window keeps its place and its counts; right after it, its
    context with the last bars replayed (the forced choice's impostor), the two paired by window number."""
    from rwkv_music.remi.tokenizer import tokenizer_from_file
    from rwkv_music.remi.windows import Vocab, replay_last_bars
    from rwkv_music.shards import TOKENIZER

    vocab = Vocab(tokenizer_from_file(train_set.root / TOKENIZER))
    shape = {"batch_tokens": 2 * 2048, "batch_size": 1} if packed else {"batch_size": 8}
    spec = DataSpec(seed=5, shuffle_buffer=64, repeat_pairs=True, **shape)
    plain = _epoch(make_stream(train_set, DataSpec(seed=5, shuffle_buffer=64, **shape)), 0)
    stream = make_stream(train_set, spec, vocab=vocab)
    paired = _epoch(stream, 0)
    assert len(paired) > 3
    if packed:  # the epoch's length counts the replays' positions, as estimated from the first shard
        used = sum(int(torch.nonzero(m).flatten().max()) + 1 for b in paired for m in b["mask"])
        assert 1.2 < stream.pair_growth() <= 2.0
        assert used / sum(b["n_tokens"] for b in paired) == pytest.approx(stream.pair_growth(), abs=0.1)
    if not packed:  # the same windows in the same batches: the pairs add work, not data
        assert len(paired) == len(plain)
        for x, y in zip(plain, paired, strict=True):
            assert (x["n_targets"], x["n_tokens"]) == (y["n_targets"], y["n_tokens"])
            assert torch.equal(x["targets"], y["targets"][y["truth_target"]])
    samples = {np.asarray(s["tokens"], dtype=np.int64).tobytes(): s for s in iter_samples(train_set.root, "train")}
    n_pairs = 0
    for b in paired:
        assert int(b["truth_target"].sum()) == b["n_targets"]
        for t, i in b["pairs"].tolist():
            assert i == t + 1 and b["truth_target"][b["target_window"] == t].all()
            assert not b["truth_target"][b["target_window"] == i].any()
            truth = samples[_window_tokens(b, t).tobytes()]  # a real window of the split
            ctx = int(truth["ctx_len"])
            replay = replay_last_bars(truth["tokens"], int(truth["meta_len"]), ctx, vocab)
            want = np.concatenate([np.asarray(truth["tokens"][:ctx]), np.asarray(replay)]).astype(np.int64)
            assert np.array_equal(_window_tokens(b, i), want)
            assert not np.array_equal(replay, truth["tokens"][ctx:])
            n_pairs += 1
    assert n_pairs > 20
    with pytest.raises(ValueError, match="Vocab"):
        make_stream(train_set, spec)
