"""TrainConfig: every knob of `musictrain fit`, loadable from TOML/JSON and overridable from the command line.

Precedence: dataclass defaults < `--config FILE` < options given explicitly on the command line. The resolved
config is written to RUN/config.json, and `--resume` starts from that file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRECISIONS = ("bf16", "bf16-weights", "fp32")
# Fields whose change would alter the data order, so a resumed run must keep them.
DATA_FIELDS = ("seed", "batch_size", "batch_tokens", "pack_len", "streams", "num_workers", "shuffle_buffer",
               "mix_shards", "bucket_pool", "format", "transpose")
# The largest --lr / --lr-final: an AdamW step moves each weight by about the rate, so past 1 training only diverges
# (and torch's AdamW cannot even take a rate past float32's range: 1e300 fails inside its step).
MAX_LR = 1.0
LR_WHY = (": an AdamW step moves each weight by about the learning rate, so a larger one only diverges (RWKV-LM "
          "trains at 1e-4 .. 1e-3)")
# What a run saved before a data field existed trained with (its default then).
DATA_FIELD_DEFAULTS = {"transpose": 0, "mix_shards": 1}


@dataclass
class TrainConfig:
    shards: str = ""
    out: str = ""
    format: str = "parquet"  # parquet | webdataset
    # model
    preset: str = "tiny"
    n_layer: int | None = None
    n_embd: int | None = None
    head_size: int | None = None
    dim_ffn: int | None = None
    init_from: str | None = None  # RWKV-LM x070 .pth, or a run / checkpoint directory
    # length of training
    max_steps: int | None = None  # default: one epoch
    max_tokens: int | None = None  # stop once this many (unpadded, global) input tokens were seen
    # batch and optimiser (RWKV-LM's x070 recipe)
    batch_size: int = 16  # samples per process per micro-step
    batch_tokens: int | None = None  # packed batches: positions per process per micro-step (None: padded)
    pack_len: int = 2048  # positions per packed row
    grad_accum: int = 1
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    grad_clip: float = 1.0
    # data
    streams: int = 1  # sample streams per process (1 process x streams=k sees the data of k DDP ranks)
    num_workers: int = 0
    shuffle_buffer: int = 2048
    mix_shards: int = 16  # shards each stream reads at once, samples drawn from them at random (1: in turn)
    bucket_pool: int = 8
    transpose: int = 0  # key augmentation: each training window moved by a random shift in +-transpose semitones
    # the loss gains repeat_contrast x max(0, repeat_margin - (truth - repeat)), mean log-likelihoods per token of
    # the true completion and of the context's last bars replayed in its place (0: off; see docs/training.md)
    repeat_contrast: float = 0.0
    repeat_margin: float = 0.1
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    grad_checkpoint: bool | None = None  # the older spelling: true = recompute "blocks" (folded in, then None)
    # none | elementwise | blocks: what backward recomputes (model/recompute.py); None: elementwise on one CUDA
    # process without --grad-accum, else none (`for_device`)
    recompute: str | None = None
    compile: bool | None = None  # None: on with CUDA (the fast path), off on the CPU
    memory_budget: float | None = None  # compiled only: AOTAutograd's activation memory budget (None: all saved)
    # bf16: bf16 autocast over fp32 weights on CUDA | bf16-weights: a bf16 copy of the weights computes, AdamW steps
    # fp32 masters (train/master_weights.py; also on the CPU) | fp32 (the reference path); None: bf16-weights on one
    # CUDA process without --grad-accum, else bf16 (`for_device`)
    precision: str | None = None
    # evaluation, checkpoints, logging
    eval_every: int = 500
    eval_batches: int | None = None  # None: the whole val split
    eval_batch_size: int | None = None  # default: batch_size
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        if self.format not in ("parquet", "webdataset"):
            raise ValueError(f"format must be parquet or webdataset, not {self.format!r}")
        from rwkv_music.model.recompute import RECOMPUTE  # here: the CLI imports this module and must stay light

        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, not {self.recompute!r}")
        if self.grad_checkpoint and self.recompute in (None, "none"):
            self.recompute = "blocks"
        self.grad_checkpoint = None  # recompute says it all from here on (and in the saved config)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("batch_size", "grad_accum", "streams", "eval_every", "save_every", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.streams:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of streams {self.streams}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give max_steps or max_tokens, not both")
        if self.memory_budget is not None and not 0.0 <= self.memory_budget <= 1.0:
            raise ValueError(f"memory_budget must be in [0, 1], got {self.memory_budget}")
        from rwkv_music.remi.transpose import check_transpose  # here too: `musictrain --help` loads no numpy

        check_transpose(self.transpose)
        if not (0 < self.lr < math.inf and 0 <= self.lr_final < math.inf) or self.warmup_steps < 0:
            raise ValueError(f"need a finite lr > 0, a finite lr_final >= 0 and warmup_steps >= 0, got lr {self.lr}, "
                             f"lr_final {self.lr_final}, warmup_steps {self.warmup_steps}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0 .. 2**63 - 1, got {self.seed}")
        for name in ("num_workers", "max_tokens", "batch_tokens", "pack_len", "shuffle_buffer", "mix_shards",
                     "bucket_pool", "eval_batches", "eval_batch_size", "n_layer", "n_embd", "head_size", "dim_ffn"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "num_workers" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'num_workers' else 1}, got {v}")
        # name, low, high, low open, high closed, why (the interval is [low, high) unless the flags say otherwise)
        for name, lo, hi, low_open, high_closed, why in (
                ("lr", 0.0, MAX_LR, True, True, LR_WHY), ("lr_final", 0.0, MAX_LR, False, True, LR_WHY),
                ("weight_decay", 0.0, math.inf, False, False, ""), ("beta1", 0.0, 1.0, False, False, ""),
                ("beta2", 0.0, 1.0, False, False, ""), ("grad_clip", 0.0, math.inf, True, False, ""),
                ("adam_eps", 0.0, math.inf, True, False, ""), ("repeat_contrast", 0.0, math.inf, False, False, ""),
                ("repeat_margin", 0.0, math.inf, False, False, "")):
            v = getattr(self, name)
            if not ((lo < v) if low_open else (lo <= v)) or not ((v <= hi) if high_closed else (v < hi)):
                interval = f"{'(' if low_open else '['}{lo}, {hi}{']' if high_closed else ')'}"
                raise ValueError(f"{name} must be in {interval}, got {v}{why}")
        if not self.init_from:  # the model's shape: a preset and overrides that make a valid model
            from rwkv_music.model.config import from_preset

            from_preset(self.preset, 1, **self.model_overrides())

    def _check_types(self) -> None:
        """Each field's value has its annotated type (a config file can hold anything; an int is a float)."""
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
        for f in fields(self):
            names = [n.strip() for n in str(f.type).split("|")]
            v = getattr(self, f.name)
            if v is None and "None" in names:
                continue
            ok = tuple(t for n in names if n != "None" for t in kinds.get(n, (object,)))
            if not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok):
                want = " or ".join(n if n != "None" else "null" for n in names)
                raise ValueError(f"{f.name} must be {want}, not {v!r}")

    def for_device(self, device_type: str, world_size: int = 1) -> None:
        """Fill in what was left to the device (None). On one CUDA process without gradient accumulation: the lean
        step, bf16 weights with fp32 masters and the element-wise work recomputed. It followed the reference path
        over 300 steps within the fp32 noise floor (bf16 autocast's own run did not quite), about as fast as
        autocast at two thirds of its memory (docs/training.md). Not shown for DDP or --grad-accum, where the bf16
        gradients are averaged or summed in bf16: those keep bf16 autocast over fp32 weights, nothing recomputed, as
        on the CPU (where "bf16" runs fp32: autocast is CUDA-only). The saved config holds the result, so a resumed
        run keeps it (on another device too)."""
        lean = device_type == "cuda" and world_size == 1 and self.grad_accum == 1
        if self.precision is None:
            self.precision = "bf16-weights" if lean else "bf16"
        if self.recompute is None:
            self.recompute = "elementwise" if lean else "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**d)

    def model_overrides(self) -> dict[str, Any]:
        """Shape fields for `from_preset` (recompute is a trainer option: fit.set_recompute)."""
        keys = ("n_layer", "n_embd", "head_size", "dim_ffn")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (or .json) file of TrainConfig keys; one level of tables is flattened ([optim] lr = ... -> lr)."""
    p = Path(path)
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of TrainConfig keys, not a {type(data).__name__}")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return {k.replace("-", "_"): v for k, v in flat.items()}


def resolve(file: str | os.PathLike | None, overrides: dict[str, Any], base: dict[str, Any] | None = None
            ) -> TrainConfig:
    """defaults < base (a saved run config) < file < overrides (explicit CLI options).

    Each layer's older ``grad_checkpoint`` becomes its ``recompute`` before the layers merge, so a later layer's
    choice wins either way (a run saved with "blocks" resumes with --recompute none as asked). A saved run that
    predates a data field resumes with what it trained with (DATA_FIELD_DEFAULTS), not today's default."""
    d: dict[str, Any] = {}
    base = {**DATA_FIELD_DEFAULTS, **base} if base else {}
    for layer in (base, read_config_file(file) if file is not None else {}, overrides):
        layer = dict(layer)
        gc = layer.pop("grad_checkpoint", None)
        if gc is not None:
            layer.setdefault("recompute", "blocks" if gc else "none")
        d.update(layer)
    return TrainConfig.from_dict(d)


def save_config(cfg: TrainConfig, run_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """RUN/config.json: the resolved TrainConfig (+ derived values such as the model config), atomically."""
    from rwkv_music.atomic import write_json_atomic

    path = Path(run_dir) / "config.json"
    write_json_atomic(path, {"train": cfg.to_dict(), **(extra or {})})
    return path


def load_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """RUN/config.json; ValueError if it is not one `save_config` wrote (unreadable JSON, no train table)."""
    path = Path(run_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable run configuration: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("train"), dict):
        raise ValueError(f"{path} is not a run configuration (no 'train' table): is {run_dir} a musictrain run?")
    return d
