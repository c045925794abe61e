"""The training loop of `musictrain fit`: one process, or one per GPU under torchrun (DDP).

The loss is the mean cross-entropy over the completion tokens of the *global* batch (all ranks, all
grad-accumulation micro-steps): each rank scales its summed loss by world_size / global_count, so DDP's
gradient averaging yields exactly the gradient of one process holding the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rwkv_music.model.compile import compile_for_training
from rwkv_music.shards.dataset import (
    PACK_EPOCH_FILL,
    DataSpec,
    ShardSet,
    iter_eval_batches,
    make_stream,
    open_split,
)

from . import checkpoints as ck
from .config import DATA_FIELDS, TrainConfig, load_run_config, save_config
from .device import DeviceUnavailable, pick_device
from .logging import RunLogger, truncate_metrics
from .optim import make_optimizer, make_scheduler


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change (the CLI prints it, exit code 1)."""


# Messages of allocation failures that are not torch.OutOfMemoryError: the CPU allocator raises a plain
# RuntimeError ("DefaultCPUAllocator: can't allocate memory ..."; "not enough memory" in other builds).
_CPU_OOM_MARKERS = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory", "std::bad_alloc")

OOM_ADVICE = ("lower --batch-size and raise --grad-accum to keep the global batch, add --grad-checkpoint, or train "
              "a smaller model (--preset, --n-layer, --n-embd) or on shards built with a smaller --max-seq-len")


def out_of_memory_kind(e: BaseException) -> str | None:
    """"CUDA" or "CPU" if `e` is a failed allocation, else None (so the caller re-raises everything else)."""
    if isinstance(e, TrainingError):
        return None
    if isinstance(e, torch.OutOfMemoryError):  # CUDA's (torch.cuda.OutOfMemoryError is the same class)
        return "CUDA" if "CUDA" in str(e) else "device"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _CPU_OOM_MARKERS)):
        return "CPU"
    return None


@contextlib.contextmanager
def oom_guard(message: Callable[[str], str]) -> Iterator[None]:
    """Turn an allocation failure into a one-line TrainingError(message(kind)), kind "CUDA" or "CPU".

    The failed step's frames are cleared first: the traceback would otherwise keep its activations alive
    while the run shuts down (and, under a memory limit, make the shutdown fail too).
    """
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        kind = out_of_memory_kind(e)
        if kind is None:
            raise
        traceback.clear_frames(e.__traceback__)
        raise TrainingError(message(kind)) from e


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class FitResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = pick_device(device_pref, info.local_rank)
    except DeviceUnavailable as e:
        raise TrainingError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_sum(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    if di.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def completion_loss_sum(model: nn.Module, batch: dict, device: torch.device, amp: bool) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's completion tokens (logits computed only there)."""
    inp = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    starts = batch.get("starts")  # packed rows: windows back to back, state reset at each start
    if starts is not None:
        starts = starts.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inp, positions=mask, starts=starts)
    if logits.shape[0] != targets.shape[0]:
        raise AssertionError(f"{logits.shape[0]} selected positions but {targets.shape[0]} targets")
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, val: ShardSet, batch_size: int, device: torch.device, amp: bool = False,
             di: DistInfo | None = None, max_batches: int | None = None, pad_id: int = 0) -> tuple[float, int]:
    """(mean loss over completion tokens, token count) of `model` on a split; ranks share the work."""
    di = di or DistInfo()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in iter_eval_batches(val, batch_size, di.rank, di.world_size, max_batches, pad_id):
        s, n = completion_loss_sum(model, batch, device, amp)
        total[0] += s.double()
        total[1] += n
    all_sum(total, di)
    model.train(was_training)
    n = int(total[1].item())
    return (total[0].item() / n if n else float("nan")), n


def _batches(stream, epoch: int, consumed: int, num_workers: int, pin: bool) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, consumed-after-this-batch, batch) from a position; checks the round-robin order."""
    from torch.utils.data import DataLoader

    W = max(1, num_workers)
    while True:
        n = stream.batches_per_epoch(epoch)
        if n == 0:
            raise TrainingError(f"epoch {epoch} has no full batch: the smallest data slot holds fewer samples than "
                                "a batch; lower --batch-size (or use fewer processes / --num-workers)")
        if consumed < n:
            stream.set_position(epoch, consumed)
            loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin,
                                **({"prefetch_factor": 4} if num_workers else {}))
            for b in loader:
                assert (b["epoch"], b["role"], b["index"]) == (epoch, consumed % W, consumed // W), \
                    "data order broken (worker round robin)"
                consumed += 1
                yield epoch, consumed, b
        epoch, consumed = epoch + 1, 0


def _build_model(cfg: TrainConfig, vocab_size: int, tok_hash: str, log) -> nn.Module:
    from rwkv_music.model import from_preset, load, load_rwkv_lm, read_meta, resize_vocab

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        src = Path(cfg.init_from)
        if src.is_file():
            model = load_rwkv_lm(src)
            old = model.cfg.vocab_size
            resize_vocab(model, vocab_size)
            log(f"init from RWKV-LM {src}: {model.cfg.n_layer} layers, n_embd {model.cfg.n_embd}; vocabulary "
                f"resized {old} -> {vocab_size} (embedding and head rows re-initialised)")
        else:
            ckpt = ck.resolve_checkpoint(src)
            h = read_meta(ckpt).get("tokenizer_hash")
            if h is not None and h != tok_hash:
                raise TrainingError(f"--init-from {ckpt} was trained with tokenizer {h[:12]}, the shards use "
                                    f"{tok_hash[:12]}")
            model = load(ckpt)
            if model.cfg.vocab_size != vocab_size:
                raise TrainingError(f"--init-from {ckpt} has vocabulary {model.cfg.vocab_size}, tokenizer {vocab_size}")
            log(f"init from {ckpt}")
        return model
    mcfg = from_preset(cfg.preset, vocab_size, **cfg.model_overrides())
    from rwkv_music.model import RWKV7

    return RWKV7(mcfg)


def _estimate_steps(cfg: TrainConfig, train: ShardSet, steps_per_epoch: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        from rwkv_music.shards import read_manifest

        m = read_manifest(train.root)
        toks, n = m["counts"]["tokens"]["train"], m["counts"]["samples"]["train"]
        per_batch = (cfg.batch_tokens * PACK_EPOCH_FILL if cfg.batch_tokens
                     else (toks / max(n, 1) - 1) * cfg.batch_size)
        per_step = max(1.0, per_batch * cfg.grad_accum * world)
        return max(1, math.ceil(cfg.max_tokens / per_step))
    return max(1, steps_per_epoch)


def fit(cfg: TrainConfig, resume: bool = False) -> FitResult:
    """Train as configured; returns where it ended. Raises TrainingError (or DataError) with a clear message."""
    di, device = init_distributed(cfg.device)
    try:
        return _fit(cfg, resume, di, device)
    finally:
        if di.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, resume: bool, di: DistInfo, device: torch.device) -> FitResult:
    from rwkv_music.remi.tokenizer import tokenizer_from_file, tokenizer_hash
    from rwkv_music.shards import TOKENIZER

    def log(msg: str) -> None:
        if di.is_main:
            print(f"[musictrain] {msg}", file=sys.stderr, flush=True)

    run_dir = Path(cfg.out)
    ckpt = ck.latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log(f"--resume: no checkpoint in {run_dir}; starting a new run")
    if not resume and (run_dir / ck.CKPT_DIR / ck.LATEST).exists():
        raise TrainingError(f"{run_dir} already holds a run; add --resume to continue it or choose another -o")
    if ckpt is not None and (run_dir / "config.json").is_file():
        saved = load_run_config(run_dir)["train"]
        changed = [f for f in DATA_FIELDS if saved.get(f) != getattr(cfg, f)]
        if changed:
            raise TrainingError(f"--resume with changed {', '.join(changed)} would change the data order; "
                                f"keep the run's values ({', '.join(f'{f}={saved.get(f)}' for f in changed)})")

    train = open_split(cfg.shards, "train", cfg.format)
    try:
        val: ShardSet | None = open_split(cfg.shards, "val", cfg.format, expect_hash=train.tokenizer_hash)
    except Exception as e:  # no val split: train anyway, without evaluation
        log(f"no validation data ({e}); training without evaluation")
        val = None
    tok_path = Path(cfg.shards) / TOKENIZER
    tokenizer = tokenizer_from_file(tok_path)
    tok_hash = tokenizer_hash(tokenizer)
    if tok_hash != train.tokenizer_hash:
        raise TrainingError(f"{tok_path} hashes to {tok_hash[:12]} but the manifest says {train.tokenizer_hash[:12]}")
    state: ck.TrainerState | None = None
    if ckpt is not None:
        state = ck.read_trainer_state(ckpt)
        if state.tokenizer_hash != tok_hash:
            raise TrainingError(f"checkpoint {ckpt} was trained with tokenizer {state.tokenizer_hash[:12]}, the "
                                f"shards in {cfg.shards} use {tok_hash[:12]}")

    # model
    if state is not None:
        from rwkv_music.model import load

        raw = load(ckpt)
        log(f"resuming from {ckpt} (step {state.step})")
    else:
        raw = _build_model(cfg, len(tokenizer), tok_hash, log)
    raw.grad_checkpoint = cfg.grad_checkpoint
    raw.to(device)
    amp = device.type == "cuda"
    model: nn.Module = raw
    if cfg.compile:
        model = compile_for_training(model)
    if di.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # data
    pad_id = int(tokenizer.pad_token_id or 0)
    spec = DataSpec(batch_size=cfg.batch_size, seed=cfg.seed, world_size=di.world_size, rank=di.rank,
                    streams=cfg.streams, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                    bucket_pool=cfg.bucket_pool, pad_id=pad_id, batch_tokens=cfg.batch_tokens,
                    pack_len=cfg.pack_len)
    stream = make_stream(train, spec)
    steps_per_epoch = stream.batches_per_epoch(0) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrainingError(f"{train.nsamples} training samples give no full step of {cfg.batch_size} x "
                            f"{cfg.grad_accum} per process on {di.world_size} process(es): lower --batch-size")
    total_steps = _estimate_steps(cfg, train, steps_per_epoch, di.world_size)

    opt = make_optimizer(raw, cfg, fused=device.type == "cuda")
    sched = make_scheduler(opt, cfg, total_steps)
    step, epoch, consumed, tokens_seen = 0, 0, 0, 0
    best_val: float | None = None
    if state is not None:
        blob = torch.load(ckpt / ck.OPTIMIZER, map_location=device, weights_only=False)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        step, epoch, consumed, tokens_seen = state.step, state.epoch, state.consumed, state.tokens_seen
        best_val = state.best_val_loss
        ck.set_rng_state(state.rng)

    logger: RunLogger | None = None
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            truncate_metrics(run_dir, step)
        shutil.copyfile(tok_path, run_dir / "tokenizer.json")
        save_config(cfg, run_dir, {
            "model": raw.cfg.to_dict(), "num_params": raw.num_params(), "world_size": di.world_size,
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "tokenizer_hash": tok_hash,
            "shards": {"train": train.nsamples, "val": val.nsamples if val else 0},
        })
        logger = RunLogger(run_dir, tensorboard=cfg.tensorboard)
        log(f"{raw.num_params() / 1e6:.2f}M parameters, {train.nsamples} train samples, {steps_per_epoch} "
            f"steps/epoch, training to step {total_steps} on {device} x {di.world_size}")

    eval_bs = cfg.eval_batch_size or cfg.batch_size
    last_val: float | None = None
    last_val_step = -1

    def run_eval() -> float | None:
        nonlocal last_val, last_val_step, best_val
        if val is None:
            return None
        with oom_guard(lambda kind: f"{kind} out of memory evaluating at step {step} (eval batch {eval_bs}): "
                                    f"lower --eval-batch-size{last_good()}"):
            v, _ = evaluate(raw, val, eval_bs, device, amp, di, cfg.eval_batches, pad_id)
        last_val, last_val_step = v, step
        if best_val is None or v < best_val:
            best_val = v
        return v

    def save() -> Path | None:
        if step != last_val_step:
            run_eval()
        path = None
        if di.is_main:
            st = ck.TrainerState(step=step, epoch=epoch, consumed=consumed, tokens_seen=tokens_seen,
                                 val_loss=last_val if last_val_step == step else None, best_val_loss=best_val,
                                 tokenizer_hash=tok_hash, rng=ck.rng_state(), config=cfg.to_dict())
            with oom_guard(lambda kind: f"{kind} out of memory writing the checkpoint of step {step}{last_good()}"):
                path = ck.save_checkpoint(run_dir, raw, opt, sched, st, tok_path, cfg.keep_last)
        if di.enabled:
            dist.barrier()
        return path

    pbar = None
    if di.is_main and cfg.progress:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    it = _batches(stream, epoch, consumed, cfg.num_workers, pin=device.type == "cuda")
    K = cfg.grad_accum
    loss_val: float | None = None
    last_ckpt: Path | None = None
    t_log, tok_log = time.perf_counter(), 0
    ws = float(di.world_size)

    def last_good() -> str:
        good = last_ckpt or ck.latest_checkpoint(run_dir)
        return f"; the last good checkpoint is {good}" if good else "; no checkpoint was written"

    micro: list[dict] = []  # the step's micro-batches

    def step_oom(kind: str) -> str:
        T = max((b["input_ids"].shape[1] for b in micro), default=0)
        shape = f"batch {cfg.batch_size} x {T} tokens" + (f", grad-accum {K}" if K > 1 else "")
        return f"{kind} out of memory at step {step + 1} ({shape}): {OOM_ADVICE}{last_good()}"

    def done() -> bool:
        if cfg.max_tokens is not None:
            return tokens_seen >= cfg.max_tokens
        return step >= total_steps

    try:
        while not done():
            micro = []
            with oom_guard(step_oom):
                for _ in range(K):
                    epoch, consumed, b = next(it)
                    micro.append(b)
                counts = torch.tensor([sum(b["n_targets"] for b in micro), sum(b["n_tokens"] for b in micro)],
                                      dtype=torch.float64, device=device)
                all_sum(counts, di)
                n_global, tok_global = counts.tolist()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for j, b in enumerate(micro):
                    sync = contextlib.nullcontext() if not di.enabled or j == K - 1 else model.no_sync()
                    with sync:
                        s, _ = completion_loss_sum(model, b, device, amp)
                        (s * (ws / n_global)).backward()
                    loss_sum += s.detach().double()
                all_sum(loss_sum, di)
                loss_val = loss_sum.item() / n_global
                gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                if not math.isfinite(loss_val) or not torch.isfinite(gnorm):
                    raise TrainingError(f"loss is {loss_val} (grad norm {gnorm.item()}) at step {step + 1}; stopping "
                                        f"without saving{last_good()}. Lower --lr or raise --warmup-steps.")
                lr = opt.param_groups[0]["lr"]
                opt.step()  # allocates AdamW's moments on the first step
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(tok_global)
            tok_log += int(tok_global)

            record: dict[str, Any] | None = None
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or done():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                record = {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tok_log / max(now - t_log, 1e-9),
                          "tokens": tokens_seen, "epoch": epoch, "grad_norm": gnorm.item()}
                t_log, tok_log = now, 0
            if step % cfg.eval_every == 0 or done():
                v = run_eval()
                if record is not None and v is not None:
                    record["val_loss"] = v
                    record["val_ppl"] = math.exp(min(v, 50.0))
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if record is not None and logger is not None:
                logger.log(record)
            if step % cfg.save_every == 0 or done():
                last_ckpt = save()
                if logger is not None:
                    logger.plot()
                t_log = time.perf_counter()
            if pbar is not None:
                pbar.update(1)
                post = {"loss": f"{loss_val:.4f}"}
                if record is not None:
                    post["tok/s"] = f"{record['tokens_per_s']:.0f}"
                pbar.set_postfix(post, refresh=False)
    finally:
        if pbar is not None:
            pbar.close()
        if logger is not None:
            logger.close()
            with contextlib.suppress(Exception):
                logger.plot()
    return FitResult(run_dir, step, loss_val, last_val, last_ckpt)
