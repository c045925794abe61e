"""AdamW parameter groups and the LR schedule, as RWKV-LM trains x070 models.

Groups (RWKV-LM RWKV-v7/train_temp): the decay base ``att.w0`` learns at 2x the LR; 2-D ``*.weight``
matrices (linear layers, embedding, head) get weight decay; everything else (LoRA factors, lerp
coefficients, norms) gets neither. Betas (0.9, 0.99); eps 1e-18 by default (RWKV-LM's value, which makes
Adam close to sign-SGD for tiny second moments; 1e-8 is the conservative choice, set ``adam_eps``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, lr2x, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            lr2x.append(p)
        elif weight_decay > 0 and p.dim() >= 2 and p.squeeze().dim() >= 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            plain.append(p)
    groups = [
        {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0, "name": "1x"},
        {"params": lr2x, "weight_decay": 0.0, "lr_scale": 2.0, "name": "w0_2x"},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **kw)


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the peak LR for optimiser step `step` (0-based): linear warm-up, then cosine to final."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    final_ratio = cfg.lr_final / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, final_ratio)
    )
