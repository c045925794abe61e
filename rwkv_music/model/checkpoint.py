"""Saving and loading RWKV-7 weights.

Project format: a directory with ``model.safetensors`` (weights, names as in the module) and
``config.json`` (``{"config": RWKV7Config fields, "meta": caller's extra data}``).

RWKV-LM format: a single ``.pth`` state dict as written by BlinkDL's x070 trainer (``emb.weight``,
``blocks.0.ln0.weight``, ``blocks.3.att.r_k``, ``head.weight``, ...). The config is read from the shapes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rwkv_music.atomic import atomic_path, write_text_atomic
from rwkv_music.errors import error_line
from rwkv_music.model.config import RWKV7Config
from rwkv_music.model.rwkv7 import RWKV7

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def save(model: RWKV7, path: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to the directory ``path`` (created if needed). Returns the directory."""
    out = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    doc = {"format": "rwkv-music/rwkv7", "config": model.cfg.to_dict(), "meta": extra_meta or {}}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(out / CONFIG_NAME, json.dumps(doc, indent=2, sort_keys=True))
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra_meta`` dict saved with a project checkpoint."""
    return json.loads((Path(path) / CONFIG_NAME).read_text()).get("meta", {})


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RWKV7:
    """Load a project checkpoint directory written by `save`."""
    src = Path(path)
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        doc = json.loads((src / CONFIG_NAME).read_text())
        cfg = RWKV7Config.from_dict(doc["config"])
        weights = load_file(src / WEIGHTS_NAME, device="cpu")
    except Exception as e:  # safetensors raises its own error type; any failure here means unreadable
        raise ValueError(f"{src} is not a readable checkpoint ({error_line(e)})") from None
    model = _empty_model(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(map_location)


def _empty_model(cfg: RWKV7Config) -> RWKV7:
    """A model with the right shapes, skipping the (slow, orthogonal) init: the caller overwrites it."""
    return RWKV7(cfg, init_weights=False)


def config_from_rwkv_lm(sd: dict[str, Tensor]) -> RWKV7Config:
    """Infer the config of an RWKV-LM x070 state dict from its tensor shapes."""
    if "blocks.0.att.r_k" not in sd or "emb.weight" not in sd:
        raise ValueError("not an RWKV-7 x070 state dict (no blocks.0.att.r_k / emb.weight)")
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    vocab_size, n_embd = sd["emb.weight"].shape
    _, head_size = sd["blocks.0.att.r_k"].shape
    mv = sd.get("blocks.1.att.v1", sd.get("blocks.0.att.v1"))
    return RWKV7Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        head_size=head_size,
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        d_decay_lora=sd["blocks.0.att.w1"].shape[1],
        d_aaa_lora=sd["blocks.0.att.a1"].shape[1],
        d_mv_lora=mv.shape[1] if mv is not None else None,
        d_gate_lora=sd["blocks.0.att.g1"].shape[1],
    )


def load_rwkv_lm(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RWKV7:
    """Load a BlinkDL RWKV-LM x070 ``.pth`` (any float dtype; the model is float32).

    The vocabulary is the checkpoint's; use `resize_vocab` to adapt it to another tokenizer.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_rwkv_lm(sd)
    model = _empty_model(cfg)
    own = model.state_dict()
    unknown = sorted(k for k in sd if k not in own and k not in _LAYER0_UNUSED)
    missing = sorted(k for k in own if k not in sd)
    if unknown or missing:
        raise ValueError(
            f"{path}: not a plain x070 checkpoint; unsupported keys {unknown[:8]}, missing keys {missing[:8]}"
        )
    with torch.no_grad():
        for k, p in own.items():
            src = sd[k]
            if src.shape != p.shape:
                if src.numel() != p.numel():
                    raise ValueError(f"{path}: {k} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                src = src.reshape(p.shape)
            p.copy_(src.to(p.dtype))
    return model.to(map_location)


def save_rwkv_lm(model: RWKV7, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write an RWKV-LM x070 ``.pth`` (loadable by RWKV-LM and the ``rwkv`` package).

    Layer 0's unused ``v0/v1/v2`` are written with RWKV-LM's initial values so strict loaders accept it.
    """
    out = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    C, D = model.cfg.n_embd, model.cfg.d_mv_lora
    lin = torch.arange(C, dtype=torch.float32) / (C - 1) - 0.5
    sd["blocks.0.att.v0"] = (0.73 - lin * 0.4).view(1, 1, C)
    sd["blocks.0.att.v1"] = torch.zeros(C, D)
    sd["blocks.0.att.v2"] = torch.zeros(D, C)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    return out


@torch.no_grad()
def resize_vocab(model: RWKV7, vocab_size: int, keep_rows: int = 0) -> RWKV7:
    """Give ``model`` a vocabulary of ``vocab_size`` tokens (in place; returns the model).

    Rows ``[0, keep_rows)`` of the embedding and head are kept (only meaningful when the two tokenizers
    share those ids); all other rows are re-initialised with RWKV-LM's embedding/head init. The
    default keeps none, which is right when moving a text model to the music vocabulary.
    """
    old_emb, old_head = model.emb.weight.data, model.head.weight.data
    keep = min(keep_rows, vocab_size, old_emb.shape[0])
    model.cfg.vocab_size = vocab_size
    model.emb = torch.nn.Embedding(vocab_size, model.cfg.n_embd, device=old_emb.device, dtype=old_emb.dtype)
    model.head = torch.nn.Linear(
        model.cfg.n_embd, vocab_size, bias=False, device=old_head.device, dtype=old_head.dtype
    )
    model.reset_vocab_parameters(start=0)
    model.emb.weight[:keep] = old_emb[:keep]
    model.head.weight[:keep] = old_head[:keep]
    return model
