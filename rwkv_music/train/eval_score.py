"""Teacher-forced scoring of the completion tokens, and the unigram baseline it is compared with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rwkv_music.shards import available_format, iter_samples, read_manifest
from rwkv_music.train.eval_data import EvalSample


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, samples: Sequence[EvalSample], types: list[str], device: torch.device,
                   batch_tokens: int = 32768, pad_id: int = 0,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Loss/perplexity/top-k accuracy of predicting each completion token from everything before it.

    Returns overall numbers, per-type numbers (type of the *target* token) and the target counts per token
    id (for the unigram cross-entropy). Losses are in nats; per-type `loss * count` sums to the overall
    `loss * count`.
    """
    model.eval()
    type_names = sorted(set(t for t in types if t))
    type_of = np.array([type_names.index(t) if t else 0 for t in types], dtype=np.int64)
    n_types = len(type_names)
    loss_sum = np.zeros(n_types)
    top1 = np.zeros(n_types, dtype=np.int64)
    top5 = np.zeros(n_types, dtype=np.int64)
    count = np.zeros(n_types, dtype=np.int64)
    id_counts = np.zeros(len(types), dtype=np.int64)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(samples[i].tokens) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    for batch in batches:
        rows = [samples[i] for i in batch]
        T = max(len(r.tokens) for r in rows) - 1
        idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
        tgt = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, r in enumerate(rows):
            t = torch.tensor(r.tokens, dtype=torch.long)
            idx[b, : len(t) - 1] = t[:-1]
            tgt[b, : len(t) - 1] = t[1:]
            mask[b, r.ctx_len - 1: len(t) - 1] = True  # positions whose next token is a completion token
        logits = model(idx.to(device), positions=mask.to(device)).float()
        target = tgt[mask].to(device)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        k = min(5, logits.shape[-1])
        best = logits.topk(k, dim=-1).indices
        hit1 = (best[:, 0] == target).cpu().numpy()
        hit5 = (best == target[:, None]).any(dim=-1).cpu().numpy()
        tt = type_of[target.cpu().numpy()]
        np.add.at(loss_sum, tt, nll.double().cpu().numpy())
        np.add.at(top1, tt, hit1)
        np.add.at(top5, tt, hit5)
        np.add.at(count, tt, 1)
        np.add.at(id_counts, target.cpu().numpy(), 1)
        if progress is not None:
            progress(len(batch))
    total = int(count.sum())
    per_type = {}
    for j, name in enumerate(type_names):
        if count[j]:
            loss = float(loss_sum[j] / count[j])
            per_type[name] = {"count": int(count[j]), "loss": loss, "perplexity": _safe_exp(loss),
                              "top1": float(top1[j] / count[j]), "top5": float(top5[j] / count[j])}
    loss = float(loss_sum.sum() / total) if total else float("nan")
    return {
        "windows": len(samples),
        "tokens": total,
        "loss": loss,
        "perplexity": _safe_exp(loss),
        "top1": float(top1.sum() / total) if total else float("nan"),
        "top5": float(top5.sum() / total) if total else float("nan"),
        "per_type": per_type,
        "_id_counts": id_counts,
    }


def _safe_exp(x: float) -> float:
    return float(math.exp(x)) if math.isfinite(x) and x < 700 else float("inf")


def unigram_baseline(shards: Path, fmt: str, vocab_size: int, val_counts: np.ndarray,
                     max_windows: int | None) -> dict:
    """The loss a model that ignores all context would get.

    `entropy_train`: entropy (nats) of the unigram distribution of the training split's completion tokens,
    the loss floor of a context-free predictor on training data. `cross_entropy_eval`: that distribution
    (add-one smoothed over the vocabulary, so unseen tokens stay finite) scored on the evaluated completion
    tokens: the loss a unigram model actually gets there.
    """
    manifest = read_manifest(shards)
    fmt = available_format(manifest, fmt)
    counts = np.zeros(vocab_size, dtype=np.int64)
    n = 0
    for row in iter_samples(shards, "train", fmt):
        toks = np.asarray(row["tokens"], dtype=np.int64)[int(row["ctx_len"]):]
        counts += np.bincount(toks, minlength=vocab_size)[:vocab_size]
        n += 1
        if max_windows is not None and n >= max_windows:
            break
    total = int(counts.sum())
    if not total:
        return {"train_windows": n, "train_tokens": 0, "entropy_train": float("nan"),
                "cross_entropy_eval": float("nan")}
    p = counts[counts > 0] / total
    q = (counts + 1) / (total + vocab_size)
    n_eval = int(val_counts.sum())
    ce = float(-(val_counts * np.log(q)).sum() / n_eval) if n_eval else float("nan")
    return {"train_windows": n, "train_tokens": total, "entropy_train": float(-(p * np.log(p)).sum()),
            "cross_entropy_eval": ce}
