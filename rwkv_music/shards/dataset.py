"""Streaming, resumable training data: shards -> shuffled, length-bucketed batches with the completion mask.

Determinism is the point of this module. An epoch's data depends only on (manifest, seed, epoch, the number
of *slots*), never on timing:

- The epoch permutes the global shard list with ``seed + epoch``, then splits it over the slots
  (``world_size x streams x num_workers``): whole shards, balanced by sample count, when that wastes at most
  5% of the samples; otherwise (few shards) every slot reads every shard and keeps every n-th sample.
- Each slot reads ``mix_shards`` of its shards at once, taking each next sample from one of them at random
  (weighted by what each has left), so that a batch mixes pieces from many shards: a shard holds each piece's
  windows together, and builds made before 2026-12-07 wrote pieces in corpus order (one shard could hold a
  single collection). Then a shuffle buffer and length bucketing (pools of ``bucket_pool`` batches sorted by
  length, cut into batches, batch order shuffled), all from RNGs seeded by (seed, epoch, slot).
- Every slot yields exactly ``M`` batches per epoch, M = the smallest slot's full-batch count, so every DDP
  rank gets the same number of batches and DataLoader workers interleave in strict round robin.
  Because the counts come from the manifest, M is known before any shard is read.
- The position is (epoch, batches consumed in the epoch). On resume each worker re-reads its stream and
  skips the batches it had produced, and the workers' roles are rotated so the round robin continues with
  the right one: the resumed run sees exactly the batches the uninterrupted one would have.

``streams`` > 1 lets one process stand in for ``streams`` DDP ranks (its batch concatenates one sub-batch
from each), so ``world_size * streams`` fixes the data a global step sees.

Packed batches (``batch_tokens``): instead of ``batch_size`` padded windows, a batch is ``batch_tokens //
pack_len`` rows of ``pack_len`` positions, each row holding several whole windows back to back with a
``starts`` flag at each window's first position (the model restarts its state there). Windows are placed
best-fit from a length-indexed buffer, so almost no position is padding. The number of batches per epoch
is estimated from the manifest's token count (with a margin, so that it is known before any shard is
read); a slot that runs short wraps around to the start of its (reshuffled) samples.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rwkv_music.remi.transpose import PitchShift, check_transpose
from rwkv_music.remi.windows import Vocab, replay_last_bars

from .manifest import ManifestError, iter_shard, read_manifest, shard_entries, unreadable_shard
from .parquet import parquet_tokenizer_hash

SHARD_SPLIT_MAX_WASTE = 0.05
# Packed epochs promise this share of a slot's estimated tokens, so slots with longer-than-average windows
# (or some packing waste) still fill their batches without wrapping around most of the time.
PACK_EPOCH_FILL = 0.9


class DataError(ValueError):
    """The shard directory cannot feed training (missing, empty, unreadable, mixed tokenizers)."""


def shard_error(path: str | os.PathLike, e: Exception) -> DataError:
    """One line naming a shard that cannot be read and why (the first line of the reader's message)."""
    return DataError(f"{unreadable_shard(path, e)}; the file is damaged or was changed after the build (`musicprep "
                     "inspect --verify` checks every shard; build again)")


@dataclass(frozen=True)
class ShardRef:
    path: str
    nsamples: int


@dataclass(frozen=True)
class SlotPlan:
    """What one slot reads in one epoch: shards (in order) and, in strided mode, which samples it keeps."""

    shards: tuple[int, ...]  # indices into the shard list
    stride: int  # keep sample i (counted over `shards`) iff i % stride == offset
    offset: int
    nsamples: int


def plan_epoch(counts: list[int], n_slots: int, seed: int, epoch: int) -> list[SlotPlan]:
    """Split the shards (sample counts `counts`) over `n_slots` for one epoch; identical on every rank."""
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(counts)).tolist()
    total = sum(counts)
    if len(counts) >= n_slots:
        loads = [0] * n_slots
        assign: list[list[int]] = [[] for _ in range(n_slots)]
        for i in order:  # greedy: next shard to the lightest slot (lowest index on ties)
            j = min(range(n_slots), key=lambda s: (loads[s], s))
            assign[j].append(i)
            loads[j] += counts[i]
        waste = total - n_slots * min(loads)
        if total > 0 and waste <= SHARD_SPLIT_MAX_WASTE * total:
            return [SlotPlan(tuple(a), 1, 0, n) for a, n in zip(assign, loads, strict=True)]
    return [SlotPlan(tuple(order), n_slots, s, len(range(s, total, n_slots))) for s in range(n_slots)]


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides the batch stream of one process."""

    batch_size: int  # samples per batch of this process (all streams together)
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    streams: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 2048
    mix_shards: int = 16  # shards a slot reads at once, interleaved at random (1: one after another)
    bucket_pool: int = 8  # batches per length-sorting pool (1: no bucketing)
    pad_id: int = 0
    batch_tokens: int | None = None  # packed batches of this many positions (None: batch_size windows)
    pack_len: int = 2048  # positions per packed row
    transpose: int = 0  # key augmentation: each window moved by a random shift in +-transpose semitones
    repeat_pairs: bool = False  # each window also as its repeat impostor (fit --repeat-contrast); needs a Vocab

    def __post_init__(self):
        if self.batch_size < 1 or self.streams < 1 or self.batch_size % self.streams:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of streams {self.streams}")
        if self.batch_tokens is not None and (self.pack_len < 16 or self.batch_tokens < self.pack_len * self.streams):
            raise ValueError(f"batch_tokens {self.batch_tokens} must hold at least one row of pack_len "
                                 f"{self.pack_len} (>= 16) per stream ({self.streams})")
        if self.shuffle_buffer < 1 or self.mix_shards < 1 or self.bucket_pool < 1:
            raise ValueError(f"shuffle_buffer {self.shuffle_buffer}, mix_shards {self.mix_shards} and bucket_pool "
                             f"{self.bucket_pool} must each be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        check_transpose(self.transpose)

    @property
    def roles(self) -> int:
        return max(1, self.num_workers)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.streams * self.roles

    @property
    def packed(self) -> bool:
        return self.batch_tokens is not None

    @property
    def sub_batch(self) -> int:
        """Windows (unpacked) or rows (packed) per stream and batch."""
        if self.batch_tokens is not None:
            return self.batch_tokens // self.pack_len // self.streams
        return self.batch_size // self.streams

    def slot(self, stream: int, role: int) -> int:
        return (self.rank * self.streams + stream) * self.roles + role


def collate(samples: list[dict], pad_id: int = 0, pairs: bool = False) -> dict:
    """Pad to the longest sample; input = tokens[:-1], target = tokens[1:]; one mask for the completion.

    ``mask[b, p]`` is True for p in ctx_len-1 .. len-2: the positions whose next token is a completion token.
    The same mask selects hidden states (in the model) and ``targets`` (here), so they line up by construction.
    A sample with an ``impostor`` (repeat pairs) puts it in the next row; `pairs` adds the keys `_assemble` lists.
    """
    if not samples:
        raise ValueError("empty batch")
    rows = [[w] for s in samples for w in _windows(s)]
    return _assemble(rows, max(len(r[0][0]) for r in rows) - 1, pad_id, packed=False, pairs=pairs)


def collate_packed(rows: list[list[dict]], pack_len: int, pad_id: int = 0, pairs: bool = False) -> dict:
    """Rows of whole windows, back to back, into [len(rows), pack_len]; the same keys as `collate` plus
    ``starts`` (True at each window's first input position) and ``n_windows``. Targets are in mask order
    (row-major), so the loss per window is exactly the unpacked one. An impostor follows its window."""
    if not rows:
        raise ValueError("empty batch")
    return _assemble([[w for s in row for w in _windows(s)] for row in rows], pack_len, pad_id, packed=True,
                     pairs=pairs)


def _windows(s: dict) -> list[tuple[np.ndarray, int, int, bool]]:
    """(tokens, ctx_len, completion_len, is_truth) of a sample's window and, if it has one, of its impostor."""
    tok = np.asarray(s["tokens"], dtype=np.int64)
    L, ctx, comp = len(tok), int(s["ctx_len"]), int(s["completion_len"])
    if ctx < 1 or comp < 1 or ctx + comp != L:
        raise ValueError(f"bad sample (len {L}, ctx_len {ctx}, completion_len {comp}): need ctx >= 1, "
                         "completion >= 1, ctx + completion = len")
    out = [(tok, ctx, comp, True)]
    if s.get("impostor") is not None:
        imp = np.asarray(s["impostor"], dtype=np.int64)
        out.append((imp, ctx, len(imp) - ctx, False))
    return out


def with_replay(s: dict, vocab: Vocab, room: int | None = None) -> dict:
    """The sample with its ``impostor``: its context followed by the context's last bars replayed
    (`replay_last_bars`); as it is where that is the true completion itself, where there is no bar to replay, or
    where the pair would take more than `room` positions (one packed row)."""
    tokens, ctx = s["tokens"], int(s["ctx_len"])
    rep = replay_last_bars(tokens, int(s["meta_len"]), ctx, vocab)
    if rep is None or np.array_equal(rep, tokens[ctx:]):
        return s
    imp = np.concatenate([np.asarray(tokens[:ctx], dtype=np.int64), np.asarray(rep, dtype=np.int64)])
    if room is not None and len(tokens) + len(imp) - 2 > room:
        return s
    return {**s, "impostor": imp}


def _positions(s: dict) -> int:
    """Input positions a sample takes in a packed row (with its impostor, if any)."""
    return len(s["tokens"]) - 1 + (len(s["impostor"]) - 1 if s.get("impostor") is not None else 0)


def _assemble(rows: list[list[tuple[np.ndarray, int, int, bool]]], T: int, pad_id: int, packed: bool,
              pairs: bool) -> dict:
    """Windows laid out back to back in rows of T positions.

    Counts (``n_tokens``, ``n_targets``, ``n_windows``) are of the true windows: they measure data. With `pairs`
    (the stream's repeat_pairs) the batch also carries, for the repeat-contrast loss, ``target_window`` (the
    window of each target, windows numbered in layout order), ``truth_target`` (False on impostor targets, which
    the cross-entropy leaves out) and ``pairs`` ([P, 2]: true window, its impostor).
    """
    R = len(rows)
    inp = np.full((R, T), pad_id, dtype=np.int64)
    tgt = np.full((R, T), pad_id, dtype=np.int64)
    mask = np.zeros((R, T), dtype=bool)
    starts = np.zeros((R, T), dtype=bool)
    window = np.full((R, T), -1, dtype=np.int64)
    pair_list: list[tuple[int, int]] = []
    truth_windows: list[bool] = []
    n_tokens = n_completion = n_all = 0
    for i, row in enumerate(rows):
        off = 0
        for tok, ctx, comp, is_truth in row:
            n = len(tok) - 1
            if off + n > T:
                raise ValueError(f"row {i} holds {off + n} positions, more than pack_len {T}")
            w = len(truth_windows)
            inp[i, off : off + n] = tok[:-1]
            tgt[i, off : off + n] = tok[1:]
            mask[i, off + ctx - 1 : off + n] = True
            window[i, off + ctx - 1 : off + n] = w
            starts[i, off] = True
            off += n
            n_all += comp
            if is_truth:
                n_tokens += n
                n_completion += comp
            else:
                pair_list.append((w - 1, w))
            truth_windows.append(is_truth)
    mask_t = torch.from_numpy(mask)
    targets = torch.from_numpy(tgt)[mask_t]
    if not targets.numel() == n_all == int(mask.sum()):
        raise ValueError(f"completion mask ({int(mask.sum())}) and targets ({n_all}) disagree")
    out = {"input_ids": torch.from_numpy(inp), "mask": mask_t, "flat_index": _flat_index(mask), "targets": targets,
           "n_tokens": n_tokens, "n_targets": n_completion}
    if packed:
        out.update(starts=torch.from_numpy(starts), n_windows=sum(truth_windows))
    if pairs:
        target_window = torch.from_numpy(window[mask])
        out.update(target_window=target_window, truth_target=torch.tensor(truth_windows)[target_window],
                   pairs=torch.tensor(pair_list, dtype=torch.int64).reshape(-1, 2))
    return out


def _flat_index(mask: np.ndarray) -> torch.Tensor:
    """The mask's positions as indices into the flattened [B * T] (row-major, the order of `targets`): found here
    on the host, so the model selects them without the device sync a boolean index costs."""
    return torch.from_numpy(np.flatnonzero(mask))


class _RowPacker:
    """Best-fit packing of windows into rows: each row takes the longest buffered window that still fits,
    until none does. The buffer is indexed by length, so a placement costs a bisect, not a scan."""

    def __init__(self, pack_len: int) -> None:
        self.pack_len = pack_len
        self.by_len: dict[int, list[dict]] = {}
        self.lengths: list[int] = []  # sorted distinct lengths present
        self.count = 0

    def add(self, s: dict) -> None:
        n = _positions(s)
        if n > self.pack_len:
            raise DataError(f"a window of {n + 1} tokens does not fit a packed row of {self.pack_len} positions: "
                            "raise --pack-len to the build's --max-seq-len")
        if n not in self.by_len:
            self.by_len[n] = []
            bisect.insort(self.lengths, n)
        self.by_len[n].append(s)
        self.count += 1

    def _take(self, room: int) -> dict | None:
        j = bisect.bisect_right(self.lengths, room) - 1
        if j < 0:
            return None
        n = self.lengths[j]
        bucket = self.by_len[n]
        s = bucket.pop(0)
        if not bucket:
            del self.by_len[n]
            self.lengths.pop(j)
        self.count -= 1
        return s

    def row(self) -> list[dict]:
        room, out = self.pack_len, []
        while (s := self._take(room)) is not None:
            out.append(s)
            room -= _positions(s)
        return out


def _weighted_index(weights: list[int], rng: random.Random) -> int:
    """An index drawn with probability weights[i] / sum(weights) (non-negative ints, not all zero)."""
    r = rng.randrange(sum(weights))
    for i, w in enumerate(weights):
        if r < w:
            return i
        r -= w
    raise AssertionError("unreachable")


class ShardStream(IterableDataset):
    """One epoch of batches for this process, starting at a given position (see the module docstring).

    Set the position with `set_position(epoch, consumed)` before creating an iterator; each iterator
    (or DataLoader iterator) yields ``batches_per_epoch() - consumed`` batches. Batches carry ``role``
    and ``index`` (the worker role and its batch number) so the consumer can check the order.
    """

    def __init__(self, root: str | os.PathLike, shards: list[ShardRef], fmt: str, spec: DataSpec,
                 mean_len: float | None = None, pitch_shift: PitchShift | None = None, vocab: Vocab | None = None):
        super().__init__()
        if spec.repeat_pairs and vocab is None:
            raise ValueError("spec.repeat_pairs needs the tokenizer's Vocab (to find the bars to repeat)")
        self.vocab = vocab
        self._pair_growth: float | None = None
        if spec.packed and not mean_len:
            raise DataError("packed batches need the split's mean window length (from the manifest)")
        if spec.transpose and pitch_shift is None:
            raise ValueError("spec.transpose needs the tokenizer's pitch ids (pitch_shift)")
        self.pitch_shift = pitch_shift
        self.root = Path(root)
        self.shards = shards
        self.fmt = fmt
        self.spec = spec
        self.mean_len = mean_len
        self.epoch = 0
        self.consumed = 0

    # -- bookkeeping (no I/O) --
    def plans(self, epoch: int) -> list[SlotPlan]:
        return plan_epoch([s.nsamples for s in self.shards], self.spec.n_slots, self.spec.seed, epoch)

    def batches_per_role(self, epoch: int) -> int:
        """M: full sub-batches of the smallest slot (the same on every rank)."""
        smallest = min(p.nsamples for p in self.plans(epoch))
        if self.spec.packed:
            positions = smallest * (self.mean_len - 1) * self.pair_growth() * PACK_EPOCH_FILL
            return math.floor(positions / (self.spec.sub_batch * self.spec.pack_len))
        return smallest // self.spec.sub_batch

    def pair_growth(self) -> float:
        """How many times its own positions a window takes in packed rows: 1, or with repeat pairs 1 + the replays'
        share, measured on the first 1024 windows of the split's first shard (so the same on every rank and on
        resume; a window whose pair would not fit a row keeps no replay, so the share depends on --pack-len)."""
        if not (self.spec.packed and self.spec.repeat_pairs):
            return 1.0
        if self._pair_growth is None:
            own = both = 0
            plan = SlotPlan(shards=(0,), stride=1, offset=0, nsamples=self.shards[0].nsamples)
            for s in self._paired(itertools.islice(self._slot_samples(plan), 1024)):
                own += len(s["tokens"]) - 1
                both += _positions(s)
            self._pair_growth = both / max(own, 1)
        return self._pair_growth

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self.spec.roles * self.batches_per_role(self.epoch if epoch is None else epoch)

    def set_position(self, epoch: int, consumed: int) -> None:
        if not 0 <= consumed <= self.batches_per_epoch(epoch):
            raise ValueError(f"position {consumed} outside epoch {epoch} of {self.batches_per_epoch(epoch)} batches")
        self.epoch, self.consumed = epoch, consumed

    def _role_start(self, role: int) -> int:
        """Batches role `role` had produced when `consumed` batches of the epoch were taken (round robin)."""
        W = self.spec.roles
        return self.consumed // W + (1 if role < self.consumed % W else 0)

    # -- the stream --
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        W = self.spec.roles
        if info is None:
            if self.spec.num_workers > 0:
                raise RuntimeError("spec.num_workers > 0 but iterated outside a DataLoader worker")
            actual = 0
        else:
            if info.num_workers != W:
                raise RuntimeError(f"DataLoader has {info.num_workers} workers, spec says {W}")
            actual = info.id
        role = (self.consumed % W + actual) % W  # rotate so the DataLoader's round robin resumes in place
        M = self.batches_per_role(self.epoch)
        start = self._role_start(role)
        plans = self.plans(self.epoch)
        make = self._slot_packed if self.spec.packed else self._slot_batches
        streams = [make(plans[self.spec.slot(s, role)], self.spec.slot(s, role)) for s in range(self.spec.streams)]
        for index in range(M):
            try:
                parts = [next(it) for it in streams]
            except StopIteration:
                raise DataError(f"epoch {self.epoch}: the shards of role {role} hold fewer samples than the "
                                "manifest says (a shard was changed after the build?)") from None
            if index < start:
                continue
            if self.spec.packed:
                batch = collate_packed([row for p in parts for row in p], self.spec.pack_len, self.spec.pad_id,
                                       pairs=self.spec.repeat_pairs)
            else:
                batch = collate([x for p in parts for x in p], self.spec.pad_id, pairs=self.spec.repeat_pairs)
            batch["role"], batch["index"], batch["epoch"] = role, index, self.epoch
            yield batch

    def _slot_packed(self, plan: SlotPlan, slot: int) -> Iterator[list[list[dict]]]:
        """Sub-batches of packed rows, forever (the caller takes M): shuffle buffer, then best-fit rows from
        a buffer of several batches' windows. A slot that runs out starts again with a new shuffle."""
        b = self.spec.sub_batch
        target = max(64, 4 * b * self.spec.pack_len // max(1, int(self.mean_len or 1)))  # windows buffered
        packer = _RowPacker(self.spec.pack_len)
        rows: list[list[dict]] = []
        for lap in range(1 << 30):
            rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}/pack{lap}")
            key_rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}/transpose{lap}")
            mix_rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}/mix{lap}")
            empty = True
            for s in self._paired(self._transposed(self._shuffled(plan, rng, mix_rng), key_rng)):
                empty = False
                packer.add(s)
                while packer.count >= target:
                    rows.append(packer.row())
                    if len(rows) == b:
                        yield rows
                        rows = []
            if empty:
                return

    def _shuffled(self, plan: SlotPlan, rng: random.Random, mix_rng: random.Random) -> Iterator[dict]:
        """The slot's samples (shards mixed by `mix_rng`) through a shuffle buffer of `shuffle_buffer` samples
        (drawing from `rng`)."""
        buf: list[dict] = []
        for s in self._slot_samples(plan, mix_rng):
            if len(buf) < self.spec.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _transposed(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """Each sample moved by its own random number of semitones (spec.transpose > 0), else as it is."""
        if not self.spec.transpose:
            yield from samples
            return
        ps, most = self.pitch_shift, self.spec.transpose
        for s in samples:
            k = ps.draw(s["tokens"], most, rng)
            yield {**s, "tokens": ps.apply(s["tokens"], k)} if k else s

    def _paired(self, samples: Iterator[dict]) -> Iterator[dict]:
        """With spec.repeat_pairs, each sample through `with_replay` (packed: only pairs that fit one row). Built
        after transposition, so both share the key."""
        if not self.spec.repeat_pairs:
            yield from samples
            return
        room = self.spec.pack_len if self.spec.packed else None
        for s in samples:
            yield with_replay(s, self.vocab, room)

    def _slot_samples(self, plan: SlotPlan, rng: random.Random | None = None) -> Iterator[dict]:
        """The plan's samples. With an `rng` and spec.mix_shards > 1, up to mix_shards shards are open at once and
        each next sample comes from one of them, drawn with weight = samples it has left (the next shard of the
        plan opens when one runs out); otherwise shard after shard. Which samples a strided slot keeps depends on
        their place in the plan's shard sequence, not on the mixing, so the slots still split the data."""
        width = self.spec.mix_shards if rng is not None else 1
        pending = list(self._plan_parts(plan))[::-1]  # (shard, its first sample's place, samples kept), next last
        open_: list[tuple[int, Iterator[dict]]] = []
        left: list[int] = []
        while pending or open_:
            while pending and len(open_) < width:
                si, base, n = pending.pop()
                if n:
                    open_.append((si, self._kept(si, base, plan)))
                    left.append(n)
            if not open_:
                return
            k = 0 if len(open_) == 1 else _weighted_index(left, rng)
            si, it = open_[k]
            try:
                s = next(it, None)
            except DataError:
                raise
            except Exception as e:  # pyarrow, tarfile, numpy: whatever the damage, name the shard
                raise shard_error(self.root / self.shards[si].path, e) from e
            left[k] -= 1
            if s is None or left[k] == 0:  # done (a shard holding fewer samples shows as a short epoch later)
                del open_[k], left[k]
            if s is not None:
                yield s

    def _plan_parts(self, plan: SlotPlan) -> Iterator[tuple[int, int, int]]:
        """Each shard of the plan: its index, the place of its first sample in the plan's sequence, and the number
        of its samples the slot keeps."""
        base = 0
        for si in plan.shards:
            n = self.shards[si].nsamples
            first = base + (plan.offset - base) % plan.stride
            yield si, base, len(range(first, base + n, plan.stride))
            base += n

    def _kept(self, si: int, base: int, plan: SlotPlan) -> Iterator[dict]:
        """Shard `si`'s samples that the slot keeps (sample i of the plan's sequence iff i % stride == offset; the
        shard's first sample is number `base`)."""
        for i, s in enumerate(iter_shard(self.root / self.shards[si].path, self.fmt), start=base):
            if i % plan.stride == plan.offset:
                yield {"tokens": s["tokens"], "meta_len": s["meta_len"], "ctx_len": s["ctx_len"],
                       "completion_len": s["completion_len"]}

    def _slot_batches(self, plan: SlotPlan, slot: int) -> Iterator[list[dict]]:
        """Shuffle buffer, then pools of `bucket_pool` sub-batches sorted by length; drops the last partial."""
        rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}")
        b, pool_size = self.spec.sub_batch, self.spec.sub_batch * max(1, self.spec.bucket_pool)
        pool: list[dict] = []

        def flush(pool: list[dict]) -> list[list[dict]]:
            pool.sort(key=lambda s: len(s["tokens"]))
            batches = [pool[j : j + b] for j in range(0, len(pool) - b + 1, b)]
            rng.shuffle(batches)
            return batches

        key_rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}/transpose")
        mix_rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}/mix")
        for s in self._paired(self._transposed(self._shuffled(plan, rng, mix_rng), key_rng)):
            pool.append(s)
            if len(pool) == pool_size:
                yield from flush(pool)
                pool = []
        yield from flush(pool)


# ---------------------------------------------------------------- opening a shard directory


@dataclass(frozen=True)
class ShardSet:
    """A checked split of a finished build: where, which format, which shards, which tokenizer."""

    root: Path
    split: str
    fmt: str
    shards: list[ShardRef]
    tokenizer_hash: str
    mean_len: float | None = None  # tokens per window, from the manifest's counts

    @property
    def nsamples(self) -> int:
        return sum(s.nsamples for s in self.shards)


def open_split(root: str | os.PathLike, split: str, fmt: str = "parquet",
               expect_hash: str | None = None) -> ShardSet:
    """Check a shard directory before training; raises DataError with a message a user can act on."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"shard directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    try:
        manifest = read_manifest(root)
    except ManifestError as e:
        raise DataError(str(e)) from e
    except ValueError as e:  # broken JSON
        raise DataError(f"{root}/manifest.json is unreadable: {e}") from e
    if fmt not in manifest.get("args", {}).get("formats", [fmt]):
        raise DataError(f"{root} has no {fmt} shards (built with formats {manifest['args']['formats']})")
    entries = [e for e in shard_entries(manifest, split, fmt) if e["nsamples"] > 0]
    if not entries:
        raise DataError(f"{root} has no {split} samples in {fmt} shards")
    mhash = manifest["tokenizer"]["hash"]
    for e in entries:
        p = root / e["path"]
        if not p.is_file():
            raise DataError(f"shard {p} listed in the manifest is missing")
        if fmt == "parquet":
            try:
                h = parquet_tokenizer_hash(p)
            except Exception as err:  # pyarrow raises its own ArrowInvalid for garbage
                raise shard_error(p, err) from err
            if h is not None and h != mhash:
                raise DataError(f"shard {p} was written with tokenizer {h[:12]}, the manifest says {mhash[:12]}: "
                                "shards from different tokenizers cannot be mixed")
    if expect_hash is not None and expect_hash != mhash:
        raise DataError(f"{root} was tokenized with tokenizer {mhash[:12]} but the checkpoint uses "
                        f"{expect_hash[:12]}: rebuild the shards with the checkpoint's tokenizer.json")
    refs = [ShardRef(e["path"], int(e["nsamples"])) for e in entries]
    counts = manifest.get("counts", {})
    n, toks = counts.get("samples", {}).get(split), counts.get("tokens", {}).get(split)
    mean_len = toks / n if n and toks else None
    return ShardSet(root, split, fmt, refs, mhash, mean_len)


def make_stream(shard_set: ShardSet, spec: DataSpec, pitch_shift: PitchShift | None = None,
                vocab: Vocab | None = None) -> ShardStream:
    return ShardStream(shard_set.root, shard_set.shards, shard_set.fmt, spec, shard_set.mean_len, pitch_shift, vocab)


def iter_eval_batches(shard_set: ShardSet, batch_size: int, rank: int = 0, world_size: int = 1,
                      max_batches: int | None = None, pad_id: int = 0) -> Iterator[dict]:
    """Validation batches in manifest order, no shuffling, last batch partial. With `max_batches`, the K =
    max_batches x batch_size x world_size samples are spread evenly over the whole split (sample i is taken when
    floor((i + 1) K / N) > floor(i K / N)): a shard holds each piece's windows together, so the first batches would be
    one collection. The j-th sample taken goes to rank j % world_size."""
    N = shard_set.nsamples
    K = N if max_batches is None else min(N, max_batches * batch_size * world_size)
    pending: list[dict] = []
    n = 0
    i = j = 0
    for ref in shard_set.shards:
        path = shard_set.root / ref.path
        try:
            for s in iter_shard(path, shard_set.fmt):
                if K >= N or (i + 1) * K // N > i * K // N:
                    if j % world_size == rank:
                        pending.append(s)
                        if len(pending) == batch_size:
                            yield collate(pending, pad_id)
                            pending, n = [], n + 1
                            if max_batches is not None and n >= max_batches:
                                return
                    j += 1
                i += 1
        except Exception as e:
            raise shard_error(path, e) from e
    if pending:
        yield collate(pending, pad_id)
