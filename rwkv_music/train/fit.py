"""The training loop of `musictrain fit`: one process, or one per GPU under torchrun (DDP).

`Trainer` sets a run up, then `Trainer.run` loops: train_step, evaluate, save, over one `RunState` (step,
epoch, consumed, tokens_seen, losses, last checkpoint) that checkpoints save and `--resume` restores.

The loss is the mean cross-entropy over the completion tokens of the *global* batch (all ranks, all
grad-accumulation micro-steps): each rank scales its summed loss by world_size / global_count, so DDP's
gradient averaging yields exactly the gradient of one process holding the whole batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rwkv_music.atomic import write_bytes_atomic
from rwkv_music.model.compile import compile_for_training
from rwkv_music.remi.transpose import pitch_shift_for
from rwkv_music.remi.windows import Vocab
from rwkv_music.shards.dataset import (
    PACK_EPOCH_FILL,
    DataError,
    DataSpec,
    ShardSet,
    iter_eval_batches,
    make_stream,
    open_split,
)

from . import checkpoints as ck
from .config import DATA_FIELD_DEFAULTS, DATA_FIELDS, TrainConfig, load_run_config, save_config
from .device import DeviceUnavailable, pick_device
from .logging import RunLogger, set_aside_earlier_logs, truncate_metrics
from .master_weights import BF16Compute
from .optim import make_optimizer, make_scheduler
from .stop import StopRequest, graceful_stop


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change (the CLI prints it, exit code 1)."""


class BadFitInput(TrainingError):
    """The arguments or the input are wrong, found before training starts (the CLI prints it, exit code 2)."""


# Messages of allocation failures that are not torch.OutOfMemoryError: the CPU allocator raises a plain
# RuntimeError ("DefaultCPUAllocator: can't allocate memory ..."; "not enough memory" in other builds).
_CPU_OOM_MARKERS = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory", "std::bad_alloc")

OOM_ADVICE = ("lower --batch-size and raise --grad-accum to keep the global batch, add --recompute elementwise "
              "(or blocks, if elementwise is already on), or train a smaller model (--preset, --n-layer, --n-embd) "
              "or on shards built with a smaller --max-seq-len")


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
    stopped_by: int | None = None  # the signal that stopped the run early (stop.py), else None


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = pick_device(device_pref, info.local_rank)
    except DeviceUnavailable as e:
        raise BadFitInput(str(e)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_sum(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    if di.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    if di.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def completion_loss_sum(model: nn.Module, batch: dict, device: torch.device, amp: bool) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's completion tokens (logits computed only there)."""
    logits, targets = _completion_logits(model, batch, device, amp)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.shape[0])


def contrast_loss_sums(model: nn.Module, batch: dict, device: torch.device, amp: bool,
                       margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch with repeat pairs (DataSpec.repeat_pairs): the summed cross-entropy over the true windows'
    completion tokens, the summed hinge max(0, margin - (l_truth - l_repeat)) over the pairs, and how many pairs
    the truth leads (l: a window's mean log-likelihood per completion token, the forced choice's score)."""
    logits, targets = _completion_logits(model, batch, device, amp)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    window = batch["target_window"].to(device, non_blocking=True)
    truth = batch["truth_target"].to(device, non_blocking=True)
    pairs = batch["pairs"].to(device, non_blocking=True)
    counts = torch.bincount(batch["target_window"]).to(device, non_blocking=True)  # on the host: no sync
    per_window = torch.zeros(len(counts), device=device).index_add_(0, window, ce)
    mean_ll = -per_window / counts
    lead = mean_ll[pairs[:, 0]] - mean_ll[pairs[:, 1]]
    return (ce * truth).sum(), torch.relu(margin - lead).sum(), (lead > 0).sum()


def _completion_logits(model: nn.Module, batch: dict, device: torch.device,
                       amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the batch's completion positions, and the targets there.

    The completion positions go to the model as flat indices found by collate, not as the boolean mask: a boolean
    index makes the host wait for the GPU (forward and backward), which then idles while the rest is launched."""
    inp = batch["input_ids"].to(device, non_blocking=True)
    flat = batch["flat_index"].to(device, non_blocking=True)
    torch._dynamo.maybe_mark_dynamic(flat, 0)  # their number changes every batch: compile for any, once
    targets = batch["targets"].to(device, non_blocking=True)
    starts = batch.get("starts")  # packed rows: windows back to back, state reset at each start
    if starts is not None:
        starts = starts.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inp, flat_positions=flat, starts=starts)
    if logits.shape[0] != targets.shape[0]:
        raise AssertionError(f"{logits.shape[0]} selected positions but {targets.shape[0]} targets")
    return logits, targets


@torch.no_grad()
def evaluate(model: nn.Module, val: ShardSet, batch_size: int, device: torch.device, *, amp: bool = False,
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


class DataItem(NamedTuple):
    """A batch and the data position after it: (epoch, batches of that epoch consumed by this rank)."""

    epoch: int
    consumed: int
    batch: dict


def _batches(stream, epoch: int, consumed: int, num_workers: int, pin: bool) -> Iterator[DataItem]:
    """Endless batches from a position; checks the round-robin order of the DataLoader's workers."""
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
            try:
                for b in loader:
                    got, want = (b["epoch"], b["role"], b["index"]), (epoch, consumed % W, consumed // W)
                    if got != want:  # a bug, not bad input: the promised data order would silently change
                        raise TrainingError(f"data order broken (worker round robin): got batch (epoch, role, "
                                            f"index) {got}, expected {want}")
                    consumed += 1
                    yield DataItem(epoch, consumed, b)
            except DataError as e:
                raise DataError(worker_message(e)) from None
        epoch, consumed = epoch + 1, 0


def worker_message(e: Exception) -> str:
    """The message of an exception a DataLoader worker raised: the worker's own last line, without the
    "Caught X in DataLoader worker process N. Original Traceback ..." text the loader wraps it in."""
    msg = str(e)
    if not msg.startswith("Caught "):
        return msg
    tail = [line for line in msg.splitlines() if line.strip()][-1]
    name = f"{type(e).__name__}: "
    return tail[tail.index(name) + len(name):] if name in tail else tail


def set_recompute(model: nn.Module, mode: str) -> None:
    """What backward recomputes: a trainer option, set on the model after it is built or loaded (so
    `--recompute` applies to resumed and --init-from models too)."""
    model.recompute = mode


def _build_model(cfg: TrainConfig, vocab_size: int, tok_hash: str, log: Callable[[str], None]) -> nn.Module:
    from rwkv_music.model import RWKV7, from_preset, load, load_rwkv_lm, read_meta, resize_vocab

    torch.manual_seed(cfg.seed)
    if not cfg.init_from:
        return RWKV7(from_preset(cfg.preset, vocab_size, **cfg.model_overrides()))
    src = Path(cfg.init_from)
    if src.is_file():
        try:
            model = load_rwkv_lm(src)
        except Exception as e:  # not a file torch can read, or not an x070 state dict
            raise BadFitInput(f"--init-from {src} is neither a checkpoint directory (a run, or one of its "
                              f"checkpoints/step-N) nor a torch .pth of an RWKV-LM x070 model: "
                              f"{_not_a_pth_reason(e, src)}") from e
        old = model.cfg.vocab_size
        resize_vocab(model, vocab_size)
        log(f"init from RWKV-LM {src}: {model.cfg.n_layer} layers, n_embd {model.cfg.n_embd}; vocabulary "
            f"resized {old} -> {vocab_size} (embedding and head rows re-initialised)")
        return model
    try:
        ckpt = ck.resolve_checkpoint(src)
    except FileNotFoundError as e:
        raise BadFitInput(f"--init-from {e}") from e
    h = read_meta(ckpt).get("tokenizer_hash")
    if h is not None and h != tok_hash:
        raise BadFitInput(f"--init-from {ckpt} was trained with tokenizer {h[:12]}, the shards use {tok_hash[:12]}")
    try:
        model = load(ckpt)
    except ValueError as e:
        raise BadFitInput(f"--init-from {e}") from None
    if model.cfg.vocab_size != vocab_size:
        raise BadFitInput(f"--init-from {ckpt} has vocabulary {model.cfg.vocab_size}, tokenizer {vocab_size}")
    log(f"init from {ckpt}")
    return model


def _not_a_pth_reason(e: Exception, src: Path) -> str:
    """A short why for `load_rwkv_lm` failing: its own ValueError (a state dict, but not an x070 one) says it;
    torch.load's errors on other files (a KeyError of a byte value, an unpickling error) only confuse."""
    import pickle

    if isinstance(e, ValueError) and not isinstance(e, pickle.UnpicklingError):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first.removeprefix(f"{src}: ")
        return first if len(first) <= 200 else first[:197] + "..."
    return "torch.load cannot read it (not a .pth file, or a damaged one)"


def _estimate_steps(cfg: TrainConfig, train: ShardSet, steps_per_epoch: int, world: int,
                    data_share: float = 1.0) -> int:
    """Steps of the run: --max-steps, else enough for --max-tokens, else one epoch. `data_share`: the part of a
    packed batch's positions that holds training windows (the rest: --repeat-contrast's replays)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        from rwkv_music.shards import read_manifest

        m = read_manifest(train.root)
        toks, n = m["counts"]["tokens"]["train"], m["counts"]["samples"]["train"]
        if cfg.batch_tokens:
            per_batch = cfg.batch_tokens * PACK_EPOCH_FILL * data_share
        else:
            per_batch = (toks / max(n, 1) - 1) * cfg.batch_size
        per_step = max(1.0, per_batch * cfg.grad_accum * world)
        return max(1, math.ceil(cfg.max_tokens / per_step))
    return max(1, steps_per_epoch)


def build_identity(shards: str | os.PathLike) -> str:
    """sha256 of a build's tokenizer and shard list (paths, sample counts, content hashes) from its manifest.

    Equal values mean the same samples in the same shards, so a resumed run sees the data order it was
    promised; the manifest's other fields (timings, arguments that changed nothing) do not count.
    """
    from rwkv_music.shards import read_manifest

    m = read_manifest(shards)
    doc = {"tokenizer": m["tokenizer"]["hash"], "shards": m["shards"]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def fit(cfg: TrainConfig, resume: bool = False, *, accept_new_data: bool = False) -> FitResult:
    """Train as configured; returns where it ended. Raises TrainingError (BadFitInput for bad input) or DataError
    with a clear message; a second SIGINT/SIGTERM raises stop.StopNow.

    The first SIGINT/SIGTERM ends the run after the current step with a checkpoint (FitResult.stopped_by).
    `accept_new_data` lets `resume` continue on shards of another build than the run's.
    """
    with graceful_stop() as stop:
        di, device = init_distributed(cfg.device)
        trainer = Trainer(cfg, di, device, resume=resume, accept_new_data=accept_new_data, stop=stop)
        result = trainer.run()
        # Only a run that ended well tears the group down, and only once every rank is here: a rank that
        # raised may leave the others inside a collective, and tearing down beside them can hang (torchrun
        # ends them when this rank exits).
        if di.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return result


@dataclass
class RunState:
    """Where the run is. The loop advances it, checkpoints save it, `--resume` restores it."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # batches of `epoch` consumed by this rank
    tokens_seen: int = 0  # global unpadded input tokens
    loss: float | None = None  # of the last step
    val_loss: float | None = None  # of the last evaluation ...
    val_step: int = -1  # ... made at this step
    best_val_loss: float | None = None
    checkpoint: Path | None = None  # the last one this run wrote
    stopped_by: int | None = None  # the signal that ends the run early


@dataclass
class StepStats:
    """One optimiser step, as metrics.jsonl records it.

    The loss and the grad norm stay on the device until read: reading them makes the host wait for the GPU,
    which then idles while the next batch is built and launched. `Trainer.run` reads them only on logged steps.
    """

    loss_sum: torch.Tensor  # float64 scalar: summed cross-entropy over the global batch's completion tokens
    n_targets: float  # completion tokens of the global batch
    grad_norm_t: torch.Tensor  # before clipping
    lr: float
    tokens: int  # global unpadded input tokens of the step
    # --repeat-contrast: the summed hinge and the pairs the truth leads (float64 device scalars), over n_pairs pairs
    contrast_sum: torch.Tensor | None = None
    leads: torch.Tensor | None = None
    n_pairs: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum.item() / self.n_targets

    def contrast(self) -> dict[str, float]:
        """The repeat-contrast term and the share of pairs the truth leads, for metrics.jsonl (empty when off)."""
        if self.contrast_sum is None or not self.n_pairs:
            return {}
        return {"repeat_contrast": self.contrast_sum.item() / self.n_pairs,
                "truth_leads_repeat": self.leads.item() / self.n_pairs}

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_t.item()


class NonFiniteWatch:
    """The first step whose loss or grad norm was not finite, kept on the device so no step waits to check.

    A bad step is found at the next check (a logged step, a checkpoint, the end), so a few more steps may
    run on bad weights; nothing is saved after it, and the error names the step that went bad.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, dtype=torch.float64, device=device)  # step (0: none yet), loss, grad norm

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        row = torch.stack([self.first.new_full((), float(step)), loss.double(), grad_norm.double()])  # no copy
        bad = (self.first[0] == 0) & ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first = torch.where(bad, row, self.first)

    def bad_step(self) -> tuple[int, float, float] | None:
        step, loss, gnorm = self.first.tolist()
        return (int(step), loss, gnorm) if step else None


@dataclass
class RunInfo:
    """What RUN/config.json records next to the TrainConfig: derived values a reader of the run wants."""

    model: dict[str, Any]
    num_params: int
    world_size: int
    total_steps: int
    steps_per_epoch: int
    tokenizer_hash: str
    build_id: str  # build_identity(shards)
    shards: dict[str, int]  # samples per split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Throughput:
    """Unpadded tokens per second of training since the last record; evaluation and saving excluded."""

    def __init__(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()


class Trainer:
    """Setup (__init__), one optimiser step (train_step), evaluate, save, and the loop (run) over one RunState."""

    def __init__(self, cfg: TrainConfig, di: DistInfo, device: torch.device, *, resume: bool = False,
                 accept_new_data: bool = False, stop: StopRequest | None = None):
        from rwkv_music.remi.tokenizer import tokenizer_from_file, tokenizer_hash
        from rwkv_music.shards import TOKENIZER

        self.cfg, self.di, self.device = cfg, di, device
        self.stop = stop or StopRequest()
        self.run_dir = Path(cfg.out)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise BadFitInput(f"-o {self.run_dir} is a file, not a run directory")
        shards_dir, out_dir = Path(cfg.shards).resolve(), self.run_dir.resolve()
        if out_dir == shards_dir or shards_dir in out_dir.parents or (out_dir / "manifest.json").exists():
            raise BadFitInput(f"-o {self.run_dir} is (inside) a shard build; the run would write over its files: "
                              "choose a directory outside it")
        cfg.for_device(device.type, di.world_size)  # precision and recompute left to the device
        # evaluation runs the fp32 model under bf16 autocast on CUDA unless --precision fp32; training does too with
        # --precision bf16, while bf16-weights computes with a bf16 copy of the weights (train/master_weights.py)
        self.amp = device.type == "cuda" and cfg.precision != "fp32"
        self.train_amp = device.type == "cuda" and cfg.precision == "bf16"
        ckpt = self._checkpoint_to_resume(resume)

        # data
        self.train = open_split(cfg.shards, "train", cfg.format)
        try:
            self.val: ShardSet | None = open_split(cfg.shards, "val", cfg.format, expect_hash=self.train.tokenizer_hash)
        except Exception as e:  # no val split: train anyway, without evaluation
            self.log(f"no validation data ({e}); training without evaluation")
            self.val = None
        self.tok_path = Path(cfg.shards) / TOKENIZER
        tokenizer = tokenizer_from_file(self.tok_path)
        self.contrast = cfg.repeat_contrast > 0
        try:
            pitch_shift = pitch_shift_for(tokenizer) if cfg.transpose else None
        except ValueError as e:
            raise BadFitInput(f"--transpose: {e}") from None
        self.tok_hash = tokenizer_hash(tokenizer)
        if self.tok_hash != self.train.tokenizer_hash:
            raise BadFitInput(f"{self.tok_path} hashes to {self.tok_hash[:12]} but the manifest says "
                              f"{self.train.tokenizer_hash[:12]}")
        self.build_id = build_identity(cfg.shards)
        saved = ck.read_trainer_state(ckpt) if ckpt is not None else None
        if saved is not None:
            self._check_resumed_data(ckpt, saved, accept_new_data)
        self.pad_id = int(tokenizer.pad_token_id or 0)

        # model
        if saved is not None:
            from rwkv_music.model import load

            self.raw = load(ckpt)
            self.log(f"resuming from {ckpt} (step {saved.step})")
        else:
            self.raw = _build_model(cfg, len(tokenizer), self.tok_hash, self.log)
        self.raw.to(device)
        if di.enabled and cfg.precision == "bf16-weights":  # DDP syncs the bf16 copy it wraps; the masters come first
            for p in self.raw.parameters():
                dist.broadcast(p.data, 0)
        self.bf16 = BF16Compute(self.raw) if cfg.precision == "bf16-weights" else None
        self.nonfinite = NonFiniteWatch(device)
        compute = self.raw if self.bf16 is None else self.bf16.model
        set_recompute(compute, cfg.recompute)
        use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        if cfg.memory_budget is not None and not use_compile:
            self.log("--memory-budget applies to compiled training only; it is ignored without --compile")
        self.model: nn.Module = (compile_for_training(compute, memory_budget=cfg.memory_budget) if use_compile
                                 else compute)
        if di.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)

        # the data stream and the length of training
        try:
            spec = DataSpec(batch_size=cfg.batch_size, seed=cfg.seed, world_size=di.world_size, rank=di.rank,
                            streams=cfg.streams, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                            mix_shards=cfg.mix_shards, bucket_pool=cfg.bucket_pool, pad_id=self.pad_id,
                            batch_tokens=cfg.batch_tokens, pack_len=cfg.pack_len, transpose=cfg.transpose,
                            repeat_pairs=self.contrast)
        except ValueError as e:  # named as the options are spelt on the command line
            options = r"\b(batch_tokens|pack_len|batch_size|streams|shuffle_buffer|mix_shards|bucket_pool)\b"
            raise BadFitInput(re.sub(options,
                                     lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None
        self.stream = make_stream(self.train, spec, pitch_shift, Vocab(tokenizer) if self.contrast else None)
        self.steps_per_epoch = self.stream.batches_per_epoch(0) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise BadFitInput(f"{self.train.nsamples} training samples give no full step of {cfg.batch_size} x "
                              f"{cfg.grad_accum} per process on {di.world_size} process(es): lower --batch-size")
        self.total_steps = _estimate_steps(cfg, self.train, self.steps_per_epoch, di.world_size,
                                           1 / self.stream.pair_growth())

        # optimiser and the run's state
        self.opt = make_optimizer(self.raw, cfg, fused=device.type == "cuda")
        self.sched = make_scheduler(self.opt, cfg, self.total_steps)
        self.state = RunState()
        if saved is not None:
            blob = torch.load(ckpt / ck.OPTIMIZER, map_location=device, weights_only=False)
            self.opt.load_state_dict(blob["optimizer"])
            self.sched.load_state_dict(blob["scheduler"])
            self.state = RunState(step=saved.step, epoch=saved.epoch, consumed=saved.consumed,
                                  tokens_seen=saved.tokens_seen, best_val_loss=saved.best_val_loss)
            ck.set_rng_state(saved.rng)
        self.logger = self._open_run_dir(resumed=saved is not None) if di.is_main else None

    # ------------------------------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self.di.is_main:
            print(f"[musictrain] {msg}", file=sys.stderr, flush=True)

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint `--resume` continues from; refuses a new run over an old one, or changed data options."""
        cfg, run_dir = self.cfg, self.run_dir
        ckpts = run_dir / ck.CKPT_DIR
        orphans = ck.step_dirs(ckpts)
        if not resume:
            if (ckpts / ck.LATEST).exists():
                raise BadFitInput(f"{run_dir} already holds a run; add --resume to continue it or choose another -o")
            if orphans:  # a new run's pruning would delete these (or keep them and drop its own)
                raise BadFitInput(f"{ckpts} holds checkpoints ({', '.join(orphans[-3:])}) but no {ck.LATEST}; "
                                  "choose another -o, or move them away to start over here")
            return None
        ckpt = ck.latest_checkpoint(run_dir)
        if ckpt is None and orphans:
            raise BadFitInput(f"--resume: {ckpts / ck.LATEST} is missing or does not name a readable checkpoint, "
                              f"but {ckpts} holds {', '.join(orphans[-3:])}; write "
                              f'{{"path": "{orphans[-1]}"}} to {ck.LATEST} to resume from one of them (or move the run '
                              "away to start over)")
        if ckpt is None and (ckpts / ck.LATEST).exists():
            raise BadFitInput(f"--resume: {ckpts / ck.LATEST} does not name a readable checkpoint and {ckpts} holds "
                              "no step-* directory: nothing is left to resume; move the run away (or delete "
                              f"{ckpts / ck.LATEST}) to start over in {run_dir}")
        if ckpt is None:
            self.log(f"--resume: no checkpoint in {run_dir}; starting a new run")
            return None
        if (run_dir / "config.json").is_file():
            try:
                saved = load_run_config(run_dir)["train"]
            except ValueError as e:
                raise BadFitInput(str(e)) from None
            changed = [f for f in DATA_FIELDS if saved.get(f, DATA_FIELD_DEFAULTS.get(f)) != getattr(cfg, f)]
            if changed:
                was = ", ".join(f"{f}={saved.get(f, DATA_FIELD_DEFAULTS.get(f))}" for f in changed)
                raise BadFitInput(f"--resume with changed {', '.join(changed)} would change the data order; "
                                  f"keep the run's values ({was})")
            was_on = saved.get("repeat_contrast", 0.0) > 0
            if was_on != (cfg.repeat_contrast > 0):
                raise BadFitInput(f"--resume cannot turn --repeat-contrast {'off' if was_on else 'on'}: the replays "
                                  f"change what each batch holds (the run's weight: "
                                  f"{saved.get('repeat_contrast', 0.0)}); its weight may change")
        return ckpt

    def _check_resumed_data(self, ckpt: Path, saved: ck.TrainerState, accept_new_data: bool) -> None:
        if saved.tokenizer_hash != self.tok_hash:
            raise BadFitInput(f"checkpoint {ckpt} was trained with tokenizer {saved.tokenizer_hash[:12]}, the "
                              f"shards in {self.cfg.shards} use {self.tok_hash[:12]}")
        if saved.build_id is None or saved.build_id == self.build_id:
            return
        if not accept_new_data:
            raise BadFitInput(f"--resume: {self.cfg.shards} is another shard build than the run trained on (build "
                              f"{self.build_id[:12]}, the run's {saved.build_id[:12]}), so the data order cannot be "
                              "the promised one; resume on the run's shards, or add --accept-new-data")
        self.log(f"--accept-new-data: continuing on build {self.build_id[:12]} (the run trained on "
                 f"{saved.build_id[:12]}); from here the data order is the new build's")

    def _open_run_dir(self, resumed: bool) -> RunLogger:
        """Rank 0: config.json, the tokenizer copy, metrics cut back to the resumed step, and the logger."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadFitInput(f"cannot create the run directory {self.run_dir}: {e.strerror or e}") from None
        if resumed:
            truncate_metrics(self.run_dir, self.state.step)
        else:  # no checkpoint here (_checkpoint_to_resume): logs found are of a run that ended before its first
            try:
                earlier = set_aside_earlier_logs(self.run_dir)
            except OSError as e:
                raise BadFitInput(f"cannot set aside the earlier run's logs in {self.run_dir}: "
                                  f"{e.strerror or e}") from None
            if earlier is not None:
                self.log(f"{self.run_dir} held the logs of an earlier run that wrote no checkpoint; moved them to "
                         f"{earlier} so this run's metrics.jsonl starts clean")
        write_bytes_atomic(self.run_dir / "tokenizer.json", self.tok_path.read_bytes())
        info = RunInfo(model=self.raw.cfg.to_dict(), num_params=self.raw.num_params(), world_size=self.di.world_size,
                       total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                       tokenizer_hash=self.tok_hash, build_id=self.build_id,
                       shards={"train": self.train.nsamples, "val": self.val.nsamples if self.val else 0})
        save_config(self.cfg, self.run_dir, info.to_dict())
        self.log(f"{info.num_params / 1e6:.2f}M parameters, {self.train.nsamples} train samples, "
                 f"{self.steps_per_epoch} steps/epoch, training to step {self.total_steps} on {self.device} x "
                 f"{self.di.world_size}")
        return RunLogger(self.run_dir, tensorboard=self.cfg.tensorboard)

    # ------------------------------------------------------------------------------------------ the parts

    def done(self) -> bool:
        if self.cfg.max_tokens is not None:
            return self.state.tokens_seen >= self.cfg.max_tokens
        return self.state.step >= self.total_steps

    def _last_good(self) -> str:
        good = self.state.checkpoint or ck.latest_checkpoint(self.run_dir)
        return f"; the last good checkpoint is {good}" if good else "; no checkpoint was written"

    def train_step(self, batches: Iterator[DataItem]) -> StepStats:
        """One optimiser step over the next grad_accum micro-batches; advances the state."""
        cfg, di, st = self.cfg, self.di, self.state
        micro: list[dict] = []

        def oom_message(kind: str) -> str:
            T = max((b["input_ids"].shape[1] for b in micro), default=0)
            rows = max((b["input_ids"].shape[0] for b in micro), default=cfg.batch_size)  # replays add rows
            shape = f"batch {rows} x {T} tokens" + (f", grad-accum {cfg.grad_accum}" if cfg.grad_accum > 1 else "")
            return f"{kind} out of memory at step {st.step + 1} ({shape}): {OOM_ADVICE}{self._last_good()}"

        with oom_guard(oom_message):
            for _ in range(cfg.grad_accum):
                item = next(batches)
                st.epoch, st.consumed = item.epoch, item.consumed
                micro.append(item.batch)
            n_global, tok_global, pairs_global = self._global_counts(micro)
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # cross-entropy, hinge, truth leads
            for j, b in enumerate(micro):
                last = j == len(micro) - 1
                with contextlib.nullcontext() if not di.enabled or last else self.model.no_sync():
                    if self.contrast:
                        s, hinge, leads = contrast_loss_sums(self.model, b, self.device, self.train_amp,
                                                             cfg.repeat_margin)
                        loss = s / n_global + cfg.repeat_contrast * hinge / max(pairs_global, 1.0)
                        sums[1:] += torch.stack([hinge.detach().double(), leads.double()])
                    else:
                        s, _ = completion_loss_sum(self.model, b, self.device, self.train_amp)
                        loss = s / n_global
                    (loss * di.world_size).backward()
                sums[0] += s.detach().double()
            all_sum(sums, di)
            loss_sum = sums[0]
            if self.bf16 is not None:
                self.bf16.grads_to_master()
            gnorm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
            self.nonfinite.add(st.step + 1, loss_sum / n_global, gnorm)
            lr = self.opt.param_groups[0]["lr"]
            self.opt.step()  # allocates AdamW's moments on the first step
            if self.bf16 is not None:
                self.bf16.master_to_compute()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        st.tokens_seen += int(tok_global)
        return StepStats(loss_sum=loss_sum, n_targets=n_global, grad_norm_t=gnorm.detach(), lr=lr,
                         tokens=int(tok_global), contrast_sum=sums[1] if self.contrast else None,
                         leads=sums[2] if self.contrast else None, n_pairs=pairs_global)

    def _global_counts(self, micro: list[dict]) -> tuple[float, float, float]:
        """(completion tokens, input tokens, repeat pairs) of the step over all ranks (true windows only); only DDP
        needs the device for it."""
        n = float(sum(b["n_targets"] for b in micro))
        tok = float(sum(b["n_tokens"] for b in micro))
        pairs = float(sum(len(b.get("pairs", ())) for b in micro))
        if not self.di.enabled:
            return n, tok, pairs
        counts = torch.tensor([n, tok, pairs], dtype=torch.float64, device=self.device)
        n, tok, pairs = all_sum(counts, self.di).tolist()
        return n, tok, pairs

    def check_finite(self) -> None:
        """Stops the run (no checkpoint) if any step so far had a non-finite loss or grad norm."""
        bad = self.nonfinite.bad_step()
        if bad is not None:
            step, loss, gnorm = bad
            raise TrainingError(f"loss is {loss} (grad norm {gnorm}) at step {step}; stopping without saving"
                                f"{self._last_good()}. Lower --lr or raise --warmup-steps.")

    def evaluate(self) -> float | None:
        """Val loss of the current weights (None without a val split); updates last and best."""
        if self.val is None:
            return None
        st, bs = self.state, self.cfg.eval_batch_size or self.cfg.batch_size
        with oom_guard(lambda kind: f"{kind} out of memory evaluating at step {st.step} (eval batch {bs}): "
                                    f"lower --eval-batch-size{self._last_good()}"):
            v, _ = evaluate(self.raw, self.val, bs, self.device, amp=self.amp, di=self.di,
                            max_batches=self.cfg.eval_batches, pad_id=self.pad_id)
        st.val_loss, st.val_step = v, st.step
        if st.best_val_loss is None or v < st.best_val_loss:
            st.best_val_loss = v
        return v

    def save(self, with_eval: bool = True) -> Path | None:
        """Checkpoint the current step (evaluated first unless it was, or with_eval is False); all ranks call it."""
        st = self.state
        self.check_finite()
        if with_eval and st.step != st.val_step:
            self.evaluate()
        path = None
        if self.di.is_main:
            saved = ck.TrainerState(step=st.step, epoch=st.epoch, consumed=st.consumed, tokens_seen=st.tokens_seen,
                                    val_loss=st.val_loss if st.val_step == st.step else None,
                                    best_val_loss=st.best_val_loss, tokenizer_hash=self.tok_hash,
                                    build_id=self.build_id, rng=ck.rng_state(), config=self.cfg.to_dict())
            with oom_guard(lambda kind: f"{kind} out of memory writing the checkpoint of step {st.step}"
                                        f"{self._last_good()}"):
                path = ck.save_checkpoint(self.run_dir, self.raw, self.opt, self.sched, saved, self.tok_path,
                                          keep_last=self.cfg.keep_last)
        if self.di.enabled:
            dist.barrier()
        st.checkpoint = path
        return path

    def stop_signal(self) -> int | None:
        """The signal any rank received (all ranks agree: all-reduced every step), or None to go on."""
        if not self.di.enabled:
            return self.stop.signum or None
        flag = torch.tensor([self.stop.signum or 0], dtype=torch.int64, device=self.device)
        signum = int(all_max(flag, self.di).item())
        return signum or None

    def _record(self, stats: StepStats, speed: Throughput) -> dict[str, Any]:
        st = self.state
        self.check_finite()
        return {"step": st.step, "loss": stats.loss, "lr": stats.lr, "tokens_per_s": speed.take(self.device),
                "tokens": st.tokens_seen, "epoch": st.epoch, "grad_norm": stats.grad_norm, **stats.contrast()}

    def _report_eval(self, record: dict[str, Any], pbar) -> None:
        v = record["val_loss"]
        line = (f"step {record['step']}/{self.total_steps}: loss {record['loss']:.4f}, val loss {v:.4f} "
                f"(ppl {record['val_ppl']:.2f}), {record['tokens_per_s']:.0f} tok/s")
        if pbar is not None:
            pbar.write(f"[musictrain] {line}", file=sys.stderr)
        else:
            self.log(line)

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> FitResult:
        cfg, st = self.cfg, self.state
        batches = _batches(self.stream, st.epoch, st.consumed, cfg.num_workers, pin=self.device.type == "cuda")
        speed = Throughput()
        pbar = None
        if self.di.is_main and cfg.progress:
            from tqdm import tqdm

            pbar = tqdm(total=self.total_steps, initial=st.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            last: StepStats | None = None
            while not self.done():
                stats = last = self.train_step(batches)
                speed.add(stats.tokens)
                evaluates = st.step % cfg.eval_every == 0 or self.done()
                record = None
                if st.step % cfg.log_every == 0 or evaluates:
                    record = self._record(stats, speed)
                if evaluates:
                    v = self.evaluate()
                    if v is not None:
                        record.update(val_loss=v, val_ppl=math.exp(min(v, 50.0)))
                        self._report_eval(record, pbar)
                    speed.restart_clock()  # evaluation time is not training throughput
                if record is not None and self.logger is not None:
                    self.logger.log(record)
                st.stopped_by = self.stop_signal()
                if st.step % cfg.save_every == 0 or self.done() or st.stopped_by:
                    self.save(with_eval=not st.stopped_by)  # a stop saves at once
                    if self.logger is not None:
                        self.logger.plot()
                    speed.restart_clock()
                if pbar is not None:
                    pbar.update(1)
                    if record is not None:  # only logged steps read the loss (reading it waits for the GPU)
                        post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                        if st.val_loss is not None:
                            post["val"] = f"{st.val_loss:.4f}"
                        pbar.set_postfix(post, refresh=False)
                if st.stopped_by:
                    break
            self.check_finite()
            if last is not None:
                st.loss = last.loss
        finally:
            if pbar is not None:
                pbar.close()
            if self.logger is not None:
                self.logger.close()
                with contextlib.suppress(Exception):
                    self.logger.plot()
        val = st.val_loss if st.val_step >= 0 else None
        return FitResult(self.run_dir, st.step, st.loss, val, st.checkpoint, stopped_by=st.stopped_by)
