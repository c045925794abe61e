"""Run-directory checkpoints: atomic save, keep-last-K + best-by-val, resume, and loading for inference.

Layout (see .notes/sample-format.md and docs/training.md)::

    RUN/checkpoints/step-00000100/   model.safetensors + config.json (rwkv_music.model.save),
                                     tokenizer.json, optimizer.pt, trainer_state.json
    RUN/checkpoints/latest.json      {"step": 100, "path": "step-00000100", "val_loss": x | null}
    RUN/checkpoints/best.json        the same for the lowest val loss so far

A checkpoint directory is written under a temporary name and renamed into place, then the pointer files
are replaced atomically, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv_music.atomic import write_json_atomic

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
BEST = "best.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
TOKENIZER = "tokenizer.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class TrainerState:
    """Everything besides weights and optimiser that a resumed run needs to continue exactly."""

    step: int
    epoch: int
    consumed: int  # batches of this epoch already consumed (per rank)
    tokens_seen: int  # global unpadded input tokens
    val_loss: float | None
    best_val_loss: float | None
    tokenizer_hash: str
    build_id: str | None = None  # fit.build_identity of the shards it trained on (None: written before it existed)
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved TrainConfig, for self-containment

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def rng_state() -> dict[str, Any]:
    import random

    # The data order does not use these (it is seeded per epoch and slot); they cover model init and any
    # randomness a future model adds (dropout).
    st = {"torch": _b64(torch.get_rng_state()), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return st


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def set_rng_state(st: dict[str, Any]) -> None:
    import ast
    import random

    if "torch" in st:
        torch.set_rng_state(_unb64(st["torch"]))
    if "python" in st:
        random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in st["cuda"]])


def save_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: TrainerState, tokenizer_json: str | os.PathLike, *,
                    keep_last: int) -> Path:
    """Write step-N atomically, update latest.json / best.json, prune old ones. Returns the checkpoint dir."""
    from rwkv_music.model import save as save_model

    ckpts = Path(run_dir) / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    name = step_name(state.step)
    final = ckpts / name
    tmp = ckpts / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, tmp, extra_meta={"step": state.step, "val_loss": state.val_loss,
                                            "tokenizer_hash": state.tokenizer_hash})
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state.to_dict(), indent=1))
    except BaseException:  # a full disk or an interrupt: leave no half-written copy (it can be hundreds of MB)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. final save right after a periodic one)
        old = ckpts / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    pointer = {"step": state.step, "path": name, "val_loss": state.val_loss}
    write_json_atomic(ckpts / LATEST, pointer)
    best = read_pointer(ckpts / BEST)
    if state.val_loss is not None and (best is None or best.get("val_loss") is None
                                       or state.val_loss < best["val_loss"] or best["path"] == name):
        write_json_atomic(ckpts / BEST, pointer)
    prune(ckpts, keep_last)
    return final


def read_pointer(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def step_dirs(ckpts: Path) -> list[str]:
    """Names of the step-N checkpoint directories in `ckpts`, oldest first (none if it does not exist)."""
    return sorted(d.name for d in ckpts.iterdir() if d.is_dir() and d.name.startswith("step-")) if ckpts.is_dir() \
        else []


def prune(ckpts: Path, keep_last: int) -> None:
    """Delete step dirs except the newest `keep_last`, the latest and the best."""
    keep = set()
    for p in (LATEST, BEST):
        ptr = read_pointer(ckpts / p)
        if ptr:
            keep.add(ptr["path"])
    steps = step_dirs(ckpts)
    keep.update(steps[-keep_last:])
    for name in steps:
        if name not in keep:
            shutil.rmtree(ckpts / name, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint latest.json points at, or None for a run without checkpoints."""
    ptr = read_pointer(Path(run_dir) / CKPT_DIR / LATEST)
    if ptr is None:
        return None
    p = Path(run_dir) / CKPT_DIR / ptr["path"]
    return p if p.is_dir() else None


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint directory from a run directory (best, else latest; or `which="latest"`) or a checkpoint dir.

    Accepts: RUN, RUN/checkpoints, RUN/checkpoints/step-N, or any directory written by `rwkv_music.model.save`.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: {'not a directory' if p.exists() else 'does not exist'} (expected a run "
                                "directory or a checkpoint directory)")
    if (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        return p
    ckpts = p / CKPT_DIR if (p / CKPT_DIR).is_dir() else p
    order = (BEST, LATEST) if which == "best" else (LATEST,)
    for ptr_name in order:
        ptr = read_pointer(ckpts / ptr_name)
        if ptr and (ckpts / ptr["path"]).is_dir():
            return ckpts / ptr["path"]
    raise FileNotFoundError(f"{p}: no checkpoint found (expected a run directory with {CKPT_DIR}/{LATEST} "
                            "or a checkpoint directory with model.safetensors)")


def read_trainer_state(ckpt: str | os.PathLike) -> TrainerState:
    d = json.loads((Path(ckpt) / STATE).read_text())
    return TrainerState(**d)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, miditok tokenizer, info dict) from a run or checkpoint directory.

    info: {"checkpoint": Path, "step", "val_loss", "tokenizer_hash"} (from the checkpoint's metadata).
    The tokenizer's hash is checked against the one recorded at training time.
    """
    from rwkv_music.model import load as load_model
    from rwkv_music.model import read_meta
    from rwkv_music.remi.tokenizer import tokenizer_from_file, tokenizer_hash

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, map_location=device).eval()
    meta = read_meta(ckpt)
    tok_path = ckpt / TOKENIZER
    if not tok_path.is_file():  # a bare model directory: look in the run dir
        tok_path = ckpt.parent.parent / TOKENIZER
    if not tok_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json next to the checkpoint or in its run directory")
    tokenizer = tokenizer_from_file(tok_path)
    h = tokenizer_hash(tokenizer)
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != h:
        raise ValueError(f"{tok_path}: tokenizer hash {h[:12]} differs from the one the model was trained with "
                         f"({meta['tokenizer_hash'][:12]})")
    if len(tokenizer) != model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {model.cfg.vocab_size}")
    info = {"checkpoint": ckpt, "step": meta.get("step"), "val_loss": meta.get("val_loss"), "tokenizer_hash": h}
    return model, tokenizer, info
