"""Streaming, resumable training data: shards -> shuffled, length-bucketed batches with the completion mask.

Determinism is the point of this module. An epoch's data depends only on (manifest, seed, epoch, the number
of *slots*), never on timing:

- The epoch permutes the global shard list with ``seed + epoch``, then splits it over the slots
  (``world_size x streams x num_workers``): whole shards, balanced by sample count, when that wastes at most
  5% of the samples; otherwise (few shards) every slot reads every shard and keeps every n-th sample.
- Each slot runs a shuffle buffer and length bucketing (pools of ``bucket_pool`` batches sorted by length,
  cut into batches, batch order shuffled), all from an RNG seeded by (seed, epoch, slot).
- Every slot yields exactly ``M`` batches per epoch, M = the smallest slot's full-batch count, so every DDP
  rank gets the same number of batches and DataLoader workers interleave in strict round robin.
  Because the counts come from the manifest, M is known before any shard is read.
- The position is (epoch, batches consumed in the epoch). On resume each worker re-reads its stream and
  skips the batches it had produced, and the workers' roles are rotated so the round robin continues with
  the right one: the resumed run sees exactly the batches the uninterrupted one would have.

``streams`` > 1 lets one process stand in for ``streams`` DDP ranks (its batch concatenates one sub-batch
from each), so ``world_size * streams`` fixes the data a global step sees.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .manifest import ManifestError, iter_shard, read_manifest, shard_entries
from .parquet import parquet_tokenizer_hash

SHARD_SPLIT_MAX_WASTE = 0.05


class DataError(ValueError):
    """The shard directory cannot feed training (missing, empty, unreadable, mixed tokenizers)."""


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
    bucket_pool: int = 8  # batches per length-sorting pool (1: no bucketing)
    pad_id: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.streams < 1 or self.batch_size % self.streams:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of streams {self.streams}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def roles(self) -> int:
        return max(1, self.num_workers)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.streams * self.roles

    @property
    def sub_batch(self) -> int:
        return self.batch_size // self.streams

    def slot(self, stream: int, role: int) -> int:
        return (self.rank * self.streams + stream) * self.roles + role


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """Pad to the longest sample; input = tokens[:-1], target = tokens[1:]; one mask for the completion.

    ``mask[b, p]`` is True for p in ctx_len-1 .. len-2: the positions whose next token is a completion token.
    The same mask selects hidden states (in the model) and ``targets`` (here), so they line up by construction.
    """
    if not samples:
        raise ValueError("empty batch")
    lengths = [len(s["tokens"]) for s in samples]
    T = max(lengths) - 1
    B = len(samples)
    inp = np.full((B, T), pad_id, dtype=np.int64)
    tgt = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    n_completion = 0
    for i, s in enumerate(samples):
        tok = np.asarray(s["tokens"], dtype=np.int64)
        L, ctx, comp = len(tok), int(s["ctx_len"]), int(s["completion_len"])
        if ctx < 1 or comp < 1 or ctx + comp != L:
            raise ValueError(f"bad sample (len {L}, ctx_len {ctx}, completion_len {comp}): need ctx >= 1, "
                             "completion >= 1, ctx + completion = len")
        inp[i, : L - 1] = tok[:-1]
        tgt[i, : L - 1] = tok[1:]
        mask[i, ctx - 1 : L - 1] = True
        n_completion += comp
    mask_t = torch.from_numpy(mask)
    targets = torch.from_numpy(tgt)[mask_t]
    assert targets.numel() == n_completion == int(mask.sum()), "completion mask and targets disagree"
    return {
        "input_ids": torch.from_numpy(inp),
        "mask": mask_t,
        "targets": targets,
        "n_tokens": int(sum(lengths)) - B,  # real (unpadded) input tokens
        "n_targets": n_completion,
    }


class ShardStream(IterableDataset):
    """One epoch of batches for this process, starting at a given position (see the module docstring).

    Set the position with `set_position(epoch, consumed)` before creating an iterator; each iterator
    (or DataLoader iterator) yields ``batches_per_epoch() - consumed`` batches. Batches carry ``role``
    and ``index`` (the worker role and its batch number) so the consumer can check the order.
    """

    def __init__(self, root: str | os.PathLike, shards: list[ShardRef], fmt: str, spec: DataSpec):
        super().__init__()
        self.root = Path(root)
        self.shards = shards
        self.fmt = fmt
        self.spec = spec
        self.epoch = 0
        self.consumed = 0

    # -- bookkeeping (no I/O) --
    def plans(self, epoch: int) -> list[SlotPlan]:
        return plan_epoch([s.nsamples for s in self.shards], self.spec.n_slots, self.spec.seed, epoch)

    def batches_per_role(self, epoch: int) -> int:
        """M: full sub-batches of the smallest slot (the same on every rank)."""
        return min(p.nsamples for p in self.plans(epoch)) // self.spec.sub_batch

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
        streams = [self._slot_batches(plans[self.spec.slot(s, role)], self.spec.slot(s, role))
                   for s in range(self.spec.streams)]
        for index in range(M):
            try:
                parts = [next(it) for it in streams]
            except StopIteration:
                raise DataError(f"epoch {self.epoch}: the shards of role {role} hold fewer samples than the "
                                "manifest says (a shard was changed after the build?)") from None
            if index < start:
                continue
            batch = collate([x for p in parts for x in p], self.spec.pad_id)
            batch["role"], batch["index"], batch["epoch"] = role, index, self.epoch
            yield batch

    def _slot_samples(self, plan: SlotPlan) -> Iterator[dict]:
        i = 0
        for si in plan.shards:
            path = self.root / self.shards[si].path
            try:
                it = iter_shard(path, self.fmt)
                for s in it:
                    if i % plan.stride == plan.offset:
                        yield {"tokens": s["tokens"], "ctx_len": s["ctx_len"], "completion_len": s["completion_len"]}
                    i += 1
            except DataError:
                raise
            except Exception as e:  # pyarrow, tarfile, numpy: whatever the damage, name the shard
                raise DataError(f"cannot read shard {path}: {type(e).__name__}: {e}") from e

    def _slot_batches(self, plan: SlotPlan, slot: int) -> Iterator[list[dict]]:
        """Shuffle buffer, then pools of `bucket_pool` sub-batches sorted by length; drops the last partial."""
        rng = random.Random(f"{self.spec.seed}/{self.epoch}/{slot}")
        b, pool_size = self.spec.sub_batch, self.spec.sub_batch * max(1, self.spec.bucket_pool)
        buf: list[dict] = []
        pool: list[dict] = []

        def flush(pool: list[dict]) -> list[list[dict]]:
            pool.sort(key=lambda s: len(s["tokens"]))
            batches = [pool[j : j + b] for j in range(0, len(pool) - b + 1, b)]
            rng.shuffle(batches)
            return batches

        for s in self._slot_samples(plan):
            if len(buf) < self.spec.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            pool.append(s)
            if len(pool) == pool_size:
                yield from flush(pool)
                pool = []
        rng.shuffle(buf)
        for s in buf:
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
                raise DataError(f"cannot read shard {p}: {type(err).__name__}: {err}") from err
            if h is not None and h != mhash:
                raise DataError(f"shard {p} was written with tokenizer {h[:12]}, the manifest says {mhash[:12]}: "
                                "shards from different tokenizers cannot be mixed")
    if expect_hash is not None and expect_hash != mhash:
        raise DataError(f"{root} was tokenized with tokenizer {mhash[:12]} but the checkpoint uses "
                        f"{expect_hash[:12]}: rebuild the shards with the checkpoint's tokenizer.json")
    refs = [ShardRef(e["path"], int(e["nsamples"])) for e in entries]
    return ShardSet(root, split, fmt, refs, mhash)


def make_stream(shard_set: ShardSet, spec: DataSpec) -> ShardStream:
    return ShardStream(shard_set.root, shard_set.shards, shard_set.fmt, spec)


def iter_eval_batches(shard_set: ShardSet, batch_size: int, rank: int = 0, world_size: int = 1,
                      max_batches: int | None = None, pad_id: int = 0) -> Iterator[dict]:
    """Validation batches in manifest order, sample i to rank i % world_size; no shuffling, last batch partial."""
    pending: list[dict] = []
    n = 0
    i = 0
    for ref in shard_set.shards:
        path = shard_set.root / ref.path
        try:
            for s in iter_shard(path, shard_set.fmt):
                if i % world_size == rank:
                    pending.append(s)
                    if len(pending) == batch_size:
                        yield collate(pending, pad_id)
                        pending, n = [], n + 1
                        if max_batches is not None and n >= max_batches:
                            return
                i += 1
        except Exception as e:
            raise DataError(f"cannot read shard {path}: {type(e).__name__}: {e}") from e
    if pending:
        yield collate(pending, pad_id)


def with_rank(spec: DataSpec, rank: int, world_size: int) -> DataSpec:
    return replace(spec, rank=rank, world_size=world_size)
