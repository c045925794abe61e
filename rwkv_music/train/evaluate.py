"""`musictrain eval`: how well a checkpoint predicts and completes held-out windows.

Two views of the same split:
- teacher-forced: loss, perplexity and top-1/top-5 accuracy on the completion tokens, overall and per token
  type, next to a unigram baseline (the entropy of the training completions' token distribution, in nats);
- generative: the model completes N windows from their context (the sampling `complete` uses) and the result
  is compared, with the music metrics of `metrics.py`, with the true completion and the context, as are two
  baselines: repeating the context's last bars and the completion of a random window from another piece.

Everything lands in one report directory: report.json, report.html and the PNG plots it shows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import symusic
import torch

from rwkv_music.atomic import atomic_path, write_text_atomic
from rwkv_music.remi.windows import Vocab, decode_window
from rwkv_music.shards import available_format, iter_samples, read_manifest
from rwkv_music.train import metrics as M
from rwkv_music.train.cli_util import clear_own_files, progress_bar
from rwkv_music.train.device import pick_device
from rwkv_music.train.eval_choice import IMPOSTORS, forced_choice

SYSTEMS = ("model", "repeat", "random")  # generated, repeat-last-bars baseline, random-window baseline
# Every file run_eval writes (what `eval --overwrite` clears from an earlier run).
REPORT_FILES = ("report.json", "report.html", "loss_per_type.png", "metric_distributions.png", "pianoroll_*.png")
SYSTEM_LABELS = {"model": "model", "repeat": "repeat last bars", "random": "random window", "truth": "ground truth",
                 "context": "context"}


PIECE_PARTS = ("all", "dev", "test")
TEST_FRACTION = 0.5  # share of pieces in the test part; the rest is dev


def piece_part(piece_id: str) -> str:
    """'dev' or 'test': a fixed function of the piece's identity (the sha256 of its file, `piece_id`).

    Sampling settings can be tuned on the dev part of a split and reported on the test part; every window of a
    piece lands in the same part, and the parts never change with the seed, the build or the window count."""
    h = hashlib.sha256(b"rwkv-music eval part\0" + piece_id.encode()).digest()
    return "test" if int.from_bytes(h[:8], "big") / 2**64 < TEST_FRACTION else "dev"


def select_pieces(samples: Sequence[EvalSample], part: str) -> list[EvalSample]:
    """The windows of the pieces in `part` ('all' keeps everything)."""
    return list(samples) if part == "all" else [s for s in samples if piece_part(s.piece_id) == part]


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"
    num_windows: int = 32  # windows completed by the model (generative part)
    max_tf_windows: int | None = 2000  # windows scored teacher-forced (None: the whole split)
    batch_tokens: int = 32768  # padded tokens per teacher-forced batch
    unigram_max_windows: int | None = 200_000  # training windows counted for the unigram baseline
    piano_rolls: int = 4
    tokens_per_bar: int | None = None  # generation budget per bar (None: complete's default)
    temperature: float | None = None  # sampling overrides; None: `musictrain complete`'s defaults
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    device: str = "auto"
    shard_format: str = "parquet"  # preferred; the other one is used if the build has only that
    choice_windows: int = 1000  # windows of the forced-choice test (0: off)
    pieces: str = "all"  # all | dev | test: the part of the split's pieces evaluated (see piece_part)

    def __post_init__(self):
        if self.pieces not in PIECE_PARTS:
            raise ValueError(f"pieces must be one of {', '.join(PIECE_PARTS)}, not {self.pieces!r}")


@dataclass
class EvalSample:
    """One window of the split (the shard sample's fields, tokens as a list)."""

    tokens: list[int]
    meta_len: int
    ctx_len: int
    completion_len: int
    piece_id: str
    source: str
    window: int
    first_bar: int

    @classmethod
    def from_row(cls, row: dict) -> EvalSample:
        return cls([int(t) for t in row["tokens"]], int(row["meta_len"]), int(row["ctx_len"]),
                   int(row["completion_len"]), str(row["piece_id"]), str(row["source"]), int(row["window"]),
                   int(row["first_bar"]))


# A completion function with the signature of `complete_windows`: (model, tokenizer, prompts [meta + context
# tokens], meta_lens, bars per prompt, *, device, seed[, progress]) -> the continuation tokens per prompt, or the
# Exception of a prompt that failed; `progress(1)`, when passed, is called after each prompt.
CompleteFn = Callable[..., list]


# ------------------------------------------------------------------------------------------------- data

def load_split(shards: Path, split: str, fmt: str) -> list[EvalSample]:
    """Every window of one split (in manifest order)."""
    manifest = read_manifest(shards)
    fmt = available_format(manifest, fmt)
    return [EvalSample.from_row(r) for r in iter_samples(shards, split, fmt)]


def sampling_config(cfg: EvalConfig):
    """`complete`'s SamplingConfig with the overrides of `cfg` applied."""
    from rwkv_music.train.sampling import SamplingConfig

    over = {k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k") if getattr(cfg, k) is not None}
    return dataclasses.replace(SamplingConfig(), **over)


def reservoir(shards: Path, split: str, fmt: str, k: int, seed: int) -> list[EvalSample]:
    """A uniform random sample of `k` windows of a split, in one streaming pass."""
    rng = np.random.default_rng(seed)
    fmt = available_format(read_manifest(shards), fmt)
    out: list[EvalSample] = []
    for n, row in enumerate(iter_samples(shards, split, fmt)):
        if len(out) < k:
            out.append(EvalSample.from_row(row))
        else:
            j = int(rng.integers(0, n + 1))
            if j < k:
                out[j] = EvalSample.from_row(row)
    return out


def spread_windows(samples: Sequence[EvalSample], n: int, seed: int) -> list[int]:
    """Indices of up to `n` windows spread over as many pieces as possible (round-robin over shuffled pieces,
    a random window within each), so one long piece cannot fill the sample."""
    rng = np.random.default_rng(seed)
    by_piece: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_piece.setdefault(s.piece_id, []).append(i)
    pieces = sorted(by_piece)
    rng.shuffle(pieces)
    pools = {p: list(rng.permutation(by_piece[p])) for p in pieces}
    out: list[int] = []
    while len(out) < n and any(pools.values()):
        for p in pieces:
            if pools[p] and len(out) < n:
                out.append(int(pools[p].pop()))
    return out


def token_types(tokenizer) -> list[str]:
    """The type of every token id: the part of its name before the first underscore (Bar, Pitch, ...)."""
    names = [""] * len(tokenizer)
    for name, i in tokenizer.vocab.items():
        names[i] = name.split("_", 1)[0]
    return names


# ------------------------------------------------------------------------------------------ teacher-forced

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


# ------------------------------------------------------------------------------------------- generation

def count_bars(tokens: Sequence[int], vocab: Vocab) -> int:
    return sum(1 for t in tokens if t in vocab.bar_ids)


@dataclass
class Decoded:
    """A decoded window: its context and completion segments."""

    context: M.NoteArray
    completion: M.NoteArray
    score: symusic.Score


def decode_segments(prompt: Sequence[int], meta_len: int, completion: Sequence[int], completion_bars: int,
                    tokenizer, vocab: Vocab) -> Decoded:
    """Decode meta + context + completion and split it at the completion's first bar.

    The completion segment always spans `completion_bars` bars: missing bars are silent, bars beyond are cut.
    Raises whatever the decoder raises on an undecodable stream.
    """
    score = decode_window(list(prompt) + list(completion), meta_len, tokenizer, vocab)
    n_ctx = count_bars(prompt[meta_len:], vocab)
    n_grid = n_ctx + max(completion_bars, count_bars(completion, vocab))
    notes = M.notes_from_score(score, n_bars=n_grid)
    return Decoded(M.bar_slice(notes, 0, n_ctx), M.bar_slice(notes, n_ctx, n_ctx + completion_bars), score)


def midi_roundtrip_ok(score: symusic.Score) -> bool:
    """The score writes as a MIDI file that reads back with the same notes."""
    try:
        back = symusic.Score.from_midi(score.dumps_midi())
    except Exception:
        return False
    return back.note_num() == score.note_num()


def complete_windows(model, tokenizer, prompts: Sequence[list[int]], meta_lens: Sequence[int],
                     bars: Sequence[int], *, device: torch.device, seed: int,
                     tokens_per_bar: int | None = None, sampling=None,
                     progress: Callable[[int], None] | None = None) -> list:
    """Continue each window prompt (meta + context tokens, exactly as in training) by its number of bars.

    Uses `complete`'s decoder, grammar, token budget and (unless `sampling`, a SamplingConfig, is given)
    default sampling; one sample per window, window k seeded with seed + k. A window that fails yields its
    exception instead of tokens.
    """
    from rwkv_music.remi.grammar import RemiGrammar
    from rwkv_music.train.complete import DEFAULT_TOKENS_PER_BAR, CompleteConfig, check_vocab, generate

    cfg = CompleteConfig()
    check_vocab(model, tokenizer)
    grammar = RemiGrammar(tokenizer)
    per_bar = tokens_per_bar or DEFAULT_TOKENS_PER_BAR
    model.eval()
    outs: list = []
    for k, (prompt, meta_len, nb) in enumerate(zip(prompts, meta_lens, bars, strict=True)):
        try:
            start = grammar.run(list(prompt), meta_len, strict=False)
            cont = generate(model, grammar, list(prompt), start, bars=nb, num_samples=1,
                            max_new_tokens=per_bar * nb, sampling=sampling or cfg.sampling, seed=seed + k,
                            cuda_graph=cfg.cuda_graph)
            outs.append(cont[0])
        except Exception as e:  # one bad window is a counted failure, not a failed evaluation
            outs.append(e)
        if progress is not None:
            progress(1)
    return outs


def generative(model, tokenizer, samples: Sequence[EvalSample], chosen: Sequence[int], device: torch.device,
               seed: int, complete_fn: CompleteFn | None = None,
               random_pool: Sequence[EvalSample] | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Complete the chosen windows and compare model, repeat and random completions with the truth.

    The random-window baseline draws, for each window, a window of another piece from `random_pool`
    (default: `samples` itself).
    """
    pool = samples if random_pool is None else random_pool
    vocab = Vocab(tokenizer)
    rng = np.random.default_rng(seed + 1)
    prompts = [samples[i].tokens[: samples[i].ctx_len] for i in chosen]
    bars = [count_bars(samples[i].tokens[samples[i].ctx_len:], vocab) for i in chosen]
    fn = complete_fn or complete_windows
    t0 = time.perf_counter()
    kw = {"progress": progress} if progress is not None else {}
    outputs = fn(model, tokenizer, prompts, [samples[i].meta_len for i in chosen], bars, device=device, seed=seed,
                 **kw)
    gen_seconds = time.perf_counter() - t0
    windows = []
    for k, i in enumerate(chosen):
        s = samples[i]
        truth = decode_segments(prompts[k], s.meta_len, s.tokens[s.ctx_len:], bars[k], tokenizer, vocab)
        others = [j for j in range(len(pool)) if pool[j].piece_id != s.piece_id]
        rec: dict = {"piece_id": s.piece_id, "source": s.source, "window": s.window, "first_bar": s.first_bar,
                     "completion_bars": bars[k]}
        segs: dict[str, M.NoteArray | None] = {"context": truth.context, "truth": truth.completion}
        out = outputs[k]
        if isinstance(out, BaseException):
            rec.update(valid=False, error=f"{type(out).__name__}: {out}", generated_tokens=0, generated_bars=0)
            segs["model"] = None
            gen_score = None
        else:
            rec.update(generated_tokens=len(out), generated_bars=count_bars(out, vocab))
            try:
                gen = decode_segments(prompts[k], s.meta_len, out, bars[k], tokenizer, vocab)
                segs["model"] = gen.completion
                gen_score = gen.score
                rec["valid"] = midi_roundtrip_ok(gen.score)
            except Exception as e:  # an undecodable stream is a result to count, not a crash
                rec.update(valid=False, error=f"decode: {type(e).__name__}: {e}")
                segs["model"] = None
                gen_score = None
        segs["repeat"] = M.repeat_last_bars(truth.context, bars[k]) if truth.context.n_bars else None
        if others:
            j = int(rng.choice(others))
            o = pool[j]
            oc = count_bars(o.tokens[o.ctx_len:], vocab)
            other = decode_segments(o.tokens[: o.ctx_len], o.meta_len, o.tokens[o.ctx_len:], oc, tokenizer, vocab)
            segs["random"] = other.completion
            rec["random_from"] = {"piece_id": o.piece_id, "window": o.window}
        else:
            segs["random"] = None
        rec["metrics"] = {name: (M.compute_metrics(seg) if seg is not None else None) for name, seg in segs.items()}
        rec["pch_distance"] = {
            name: ({"truth": M.pitch_class_histogram_distance(seg, truth.completion),
                    "context": M.pitch_class_histogram_distance(seg, truth.context)} if seg is not None else None)
            for name, seg in segs.items() if name != "context"
        }
        rec["_segments"] = segs
        rec["_scores"] = {"truth": truth.score, "model": gen_score}
        windows.append(rec)
    return {"windows": windows, "generation_seconds": gen_seconds}


def _nan_stats(values: list[float]) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan")}
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}


def summarize_generative(windows: list[dict]) -> dict:
    """Per system: metric distributions, mean absolute error against the truth, histogram distances; plus how
    often the model beats the random-window baseline."""
    n = len(windows)
    out: dict = {
        "n_windows": n,
        "valid_midi_rate": float(np.mean([w["valid"] for w in windows])) if n else float("nan"),
        "bars_ok_rate": float(np.mean([w["generated_bars"] == w["completion_bars"] for w in windows]))
        if n else float("nan"),
        "systems": {},
    }
    for name in ("truth", "context", *SYSTEMS):
        rows = [w["metrics"].get(name) for w in windows]
        sys_out: dict = {"values": {m: _nan_stats([r[m] if r else None for r in rows]) for m in M.METRIC_NAMES}}
        if name not in ("truth", "context"):
            sys_out["available"] = sum(r is not None for r in rows)
            errs = {}
            for m in M.METRIC_NAMES:
                errs[m] = _nan_stats([abs(r[m] - w["metrics"]["truth"][m]) if r else None
                                      for r, w in zip(rows, windows, strict=True)])
            sys_out["abs_error_vs_truth"] = errs
        if name != "context":
            d = [w["pch_distance"].get(name) for w in windows]
            sys_out["pch_distance_truth"] = _nan_stats([x["truth"] if x else None for x in d])
            sys_out["pch_distance_context"] = _nan_stats([x["context"] if x else None for x in d])
        out["systems"][name] = sys_out
    # Per metric: share of windows where the model's error is below the random window's (ties count half).
    wins = {}
    for m in (*M.METRIC_NAMES, "pch_distance_truth"):
        scores = []
        for w in windows:
            mm, rr = w["metrics"].get("model"), w["metrics"].get("random")
            if mm is None or rr is None:
                continue
            if m == "pch_distance_truth":
                em, er = w["pch_distance"]["model"]["truth"], w["pch_distance"]["random"]["truth"]
            else:
                em, er = abs(mm[m] - w["metrics"]["truth"][m]), abs(rr[m] - w["metrics"]["truth"][m])
            if math.isfinite(em) and math.isfinite(er):
                scores.append(1.0 if em < er else 0.5 if em == er else 0.0)
        wins[m] = {"n": len(scores), "model_closer_rate": float(np.mean(scores)) if scores else float("nan")}
    out["model_vs_random"] = wins
    return out


# ------------------------------------------------------------------------------------------------ report

def _savefig(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def _json_clean(x):
    """NaN/inf -> None so report.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list | tuple):
        return [_json_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def plot_loss_per_type(tf: dict, unigram: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    items = sorted(tf["per_type"].items(), key=lambda kv: -kv[1]["count"])
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(items) + 2), 3.6))
    names = [k for k, _ in items]
    ax.bar(names, [v["loss"] for _, v in items], color="#4477aa")
    for x, (_, v) in enumerate(items):
        ax.text(x, v["loss"], f"n={v['count']}", ha="center", va="bottom", fontsize=7)
    ax.axhline(tf["loss"], color="k", lw=1, label=f"overall {tf['loss']:.3f}")
    if math.isfinite(unigram.get("entropy_train", float("nan"))):
        ax.axhline(unigram["entropy_train"], color="#cc3311", ls="--", lw=1,
                   label=f"unigram entropy {unigram['entropy_train']:.3f}")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("teacher-forced loss on completion tokens, by target type")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    _savefig(fig, path)
    plt.close(fig)


def plot_metric_distributions(windows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = ["pch_distance_truth", *[m for m in M.METRIC_NAMES if m != "n_notes"]]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows))
    systems = ["truth", *SYSTEMS]
    for ax, m in zip(axes.ravel(), panels, strict=False):
        data, labels = [], []
        for sname in systems:
            if m == "pch_distance_truth":
                if sname == "truth":
                    continue
                vals = [w["pch_distance"][sname]["truth"] for w in windows if w["pch_distance"].get(sname)]
            else:
                vals = [w["metrics"][sname][m] for w in windows if w["metrics"].get(sname)]
            vals = [v for v in vals if math.isfinite(v)]
            data.append(vals if vals else [float("nan")])
            labels.append(SYSTEM_LABELS[sname])
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=7)
        ax.set_title("pitch-class histogram distance to truth" if m == "pch_distance_truth" else m, fontsize=9)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def _draw_roll(ax, seg: M.NoteArray, offset: int, color: str) -> None:
    for t, d, p in zip(seg.onset.tolist(), seg.duration.tolist(), seg.pitch.tolist(), strict=True):
        ax.broken_barh([((t + offset) / seg.tpq, max(d, 1) / seg.tpq)], (p - 0.4, 0.8), color=color)


def plot_piano_roll(rec: dict, path: Path) -> None:
    """Context (grey) followed by the true completion (top) and the model's (bottom), in quarter notes."""
    import matplotlib.pyplot as plt

    segs = rec["_segments"]
    ctx = segs["context"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True, sharey=True)
    for ax, name, color in ((axes[0], "truth", "#228833"), (axes[1], "model", "#4477aa")):
        _draw_roll(ax, ctx, 0, "#999999")
        seg = segs.get(name)
        if seg is not None:
            _draw_roll(ax, seg, ctx.end, color)
        else:
            ax.text(ctx.end / ctx.tpq, 60, "  (no valid output)", va="center")
        grid = ctx.bars.tolist() + [b + ctx.end for b in segs["truth"].bars.tolist()]
        for b in grid:
            ax.axvline(b / ctx.tpq, color="#dddddd", lw=0.5, zorder=0)
        ax.axvline(ctx.end / ctx.tpq, color="k", lw=1)
        ax.set_ylabel(f"{SYSTEM_LABELS[name]}\npitch")
    axes[1].set_xlabel("quarter notes from the window's first bar (line: completion starts)")
    axes[0].set_title(f"{rec['source']} window {rec['window']}", fontsize=9)
    _savefig(fig, path)
    plt.close(fig)


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{nd}f}"
    return html.escape(str(x))


def render_html(report: dict) -> str:
    tf, uni, gen = report["teacher_forced"], report["unigram"], report.get("generative")
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>rwkv-music eval</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f3f3f3}</style></head><body>",
         "<h1>Evaluation report</h1>",
         f"<p>checkpoint <code>{html.escape(report['checkpoint'])}</code>, shards "
         f"<code>{html.escape(report['shards'])}</code>, split <b>{html.escape(report['split'])}</b>, device "
         f"{html.escape(report['device'])}, pieces <b>{html.escape(report['pieces']['part'])}</b> "
         f"({report['pieces']['pieces']} of {report['pieces']['split_pieces']} pieces, {report['pieces']['windows']} "
         "windows)</p>",
         "<h2>Teacher-forced (completion tokens)</h2><table><tr><th></th><th>tokens</th><th>loss (nats)</th>"
         "<th>perplexity</th><th>top-1</th><th>top-5</th></tr>",
         f"<tr><th>all</th><td>{tf['tokens']}</td><td>{_fmt(tf['loss'])}</td><td>{_fmt(tf['perplexity'], 2)}</td>"
         f"<td>{_fmt(tf['top1'])}</td><td>{_fmt(tf['top5'])}</td></tr>"]
    for name, v in sorted(tf["per_type"].items(), key=lambda kv: -kv[1]["count"]):
        h.append(f"<tr><th>{html.escape(name)}</th><td>{v['count']}</td><td>{_fmt(v['loss'])}</td>"
                 f"<td>{_fmt(v['perplexity'], 2)}</td><td>{_fmt(v['top1'])}</td><td>{_fmt(v['top5'])}</td></tr>")
    h.append("</table>")
    h.append(f"<p>Unigram baseline: entropy of the training completions' token distribution "
             f"<b>{_fmt(uni['entropy_train'])}</b> nats ({uni['train_tokens']} tokens); its cross-entropy on the "
             f"evaluated tokens {_fmt(uni['cross_entropy_eval'])} nats.</p>")
    h.append("<img src='loss_per_type.png'>")
    fc = report.get("forced_choice")
    if fc:
        c = fc["comparisons"]
        h.append(f"<h2>Forced choice ({fc['windows']} windows)</h2><p>Mean log-likelihood per token of the true "
                 "completion against an impostor after the same prefix: the share of windows where the truth is "
                 "more likely (windows whose impostor equals the truth are left out).</p><table><tr><th>impostor"
                 "</th><th>windows</th><th>truth first</th><th>share</th><th>goal</th><th>identical</th>"
                 "<th>mean margin (nats/token)</th></tr>")
        for name in IMPOSTORS:
            v = c[name]
            h.append(f"<tr><th>{SYSTEM_LABELS[name]}</th><td>{v['n']}</td><td>{v['truth_first']}</td>"
                     f"<td>{_fmt(v['share'])}</td><td>{_fmt(v['goal'], 2)}</td><td>{v['identical']}</td>"
                     f"<td>{_fmt(v['mean_margin_nats'])}</td></tr>")
        v = c["all"]
        h.append(f"<tr><th>both</th><td>{v['n']}</td><td>{v['truth_first']}</td><td>{_fmt(v['share'])}</td>"
                 "<td>–</td><td>–</td><td>–</td></tr></table>")
    if gen:
        h.append(f"<h2>Generative ({gen['n_windows']} windows)</h2><p>valid MIDI: {_fmt(gen['valid_midi_rate'])}"
                 f", right number of bars: {_fmt(gen['bars_ok_rate'])}</p>")
        systems = ["truth", "context", *SYSTEMS]
        h.append("<table><tr><th>metric (mean)</th>" + "".join(f"<th>{SYSTEM_LABELS[s]}</th>" for s in systems)
                 + "</tr>")
        for m in M.METRIC_NAMES:
            h.append(f"<tr><th>{m}</th>" + "".join(
                f"<td>{_fmt(gen['systems'][s]['values'][m]['mean'])}</td>" for s in systems) + "</tr>")
        h.append("</table><h3>Closeness to the true completion (lower is closer)</h3><table><tr><th>mean</th>"
                 + "".join(f"<th>{SYSTEM_LABELS[s]}</th>" for s in SYSTEMS) + "<th>model closer than random</th></tr>")
        h.append("<tr><th>pitch-class histogram distance</th>" + "".join(
            f"<td>{_fmt(gen['systems'][s]['pch_distance_truth']['mean'])}</td>" for s in SYSTEMS)
            + f"<td>{_fmt(gen['model_vs_random']['pch_distance_truth']['model_closer_rate'])}</td></tr>")
        for m in M.METRIC_NAMES:
            h.append(f"<tr><th>|{m} − truth|</th>" + "".join(
                f"<td>{_fmt(gen['systems'][s]['abs_error_vs_truth'][m]['mean'])}</td>" for s in SYSTEMS)
                + f"<td>{_fmt(gen['model_vs_random'][m]['model_closer_rate'])}</td></tr>")
        h.append("</table><img src='metric_distributions.png'><h3>Piano rolls</h3>")
        for p in report.get("plots", {}).get("piano_rolls", []):
            h.append(f"<p><img src='{html.escape(p)}'></p>")
    h.append("<p>Metric definitions: docs/evaluation.md.</p></body></html>")
    return "\n".join(h)


@dataclass
class EvalResult:
    report: dict
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def run_eval(model: torch.nn.Module, tokenizer, shards: str | os.PathLike, out_dir: str | os.PathLike,
             cfg: EvalConfig, checkpoint_label: str = "", complete_fn: CompleteFn | None = None,
             tokenizer_hash: str | None = None, overwrite: bool = False, progress: bool = False) -> EvalResult:
    """The whole evaluation of one loaded model; writes report.json, report.html and PNGs into out_dir.

    `overwrite`: once the inputs are known to be good, delete the report files (REPORT_FILES) an earlier run
    left in out_dir, so none is mixed with the new ones. `progress`: tqdm bars on stderr per part."""
    shards, out = Path(shards), Path(out_dir)
    device = pick_device(cfg.device)
    model = model.to(device)
    manifest = read_manifest(shards)
    shard_hash = manifest.get("tokenizer", {}).get("hash")
    if tokenizer_hash is not None and shard_hash is not None and tokenizer_hash != shard_hash:
        raise ValueError(f"the checkpoint's tokenizer (hash {tokenizer_hash[:12]}) is not the one the shards were "
                         f"built with ({shard_hash[:12]}): token ids would not match")
    all_samples = load_split(shards, cfg.split, cfg.shard_format)
    if not all_samples:
        raise ValueError(f"split {cfg.split!r} of {shards} has no windows")
    samples = select_pieces(all_samples, cfg.pieces)
    if not samples:
        raise ValueError(f"split {cfg.split!r} of {shards} has no windows in the {cfg.pieces!r} part of its pieces")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_own_files(out, REPORT_FILES)
    t0 = time.perf_counter()
    tf_idx = (list(range(len(samples))) if cfg.max_tf_windows is None or cfg.max_tf_windows >= len(samples)
              else sorted(spread_windows(samples, cfg.max_tf_windows, cfg.seed)))
    types = token_types(tokenizer)
    with progress_bar(progress, len(tf_idx), "teacher-forced", "window") as bar:
        tf = teacher_forced(model, [samples[i] for i in tf_idx], types, device, cfg.batch_tokens,
                            pad_id=int(tokenizer.pad_token_id or 0), progress=bar.update)
    tf_seconds = time.perf_counter() - t0
    uni = unigram_baseline(shards, cfg.shard_format, len(tokenizer), tf.pop("_id_counts"), cfg.unigram_max_windows)
    report: dict = {
        "checkpoint": checkpoint_label,
        "shards": str(shards),
        "split": cfg.split,
        "pieces": {"part": cfg.pieces, "test_fraction": TEST_FRACTION, "pieces": len({s.piece_id for s in samples}),
                   "windows": len(samples), "split_pieces": len({s.piece_id for s in all_samples}),
                   "split_windows": len(all_samples)},
        "device": str(device),
        "config": asdict(cfg),
        "teacher_forced": tf,
        "unigram": uni,
        "loss_below_unigram_nats": (uni["entropy_train"] - tf["loss"]) if math.isfinite(tf["loss"]) else None,
        "timing_s": {"teacher_forced": tf_seconds},
        "plots": {"loss_per_type": "loss_per_type.png"},
    }
    files = [out / "loss_per_type.png"]
    plot_loss_per_type(tf, uni, out / "loss_per_type.png")
    vocab = Vocab(tokenizer)
    # Only windows that kept at least one context bar have a context to continue or repeat (long bars can push
    # the whole context out of a window at max_seq_len).
    with_context = [i for i, s in enumerate(samples) if count_bars(s.tokens[s.meta_len:s.ctx_len], vocab)]
    pool, pool_split = samples, cfg.split
    if len({s.piece_id for s in samples}) < 2:  # one piece: other pieces come from the training split
        pool, pool_split = samples + reservoir(shards, "train", cfg.shard_format, 4096, cfg.seed), "train"
    if cfg.choice_windows > 0:
        t0 = time.perf_counter()
        picked = sorted(with_context[j] for j in spread_windows([samples[i] for i in with_context],
                                                                cfg.choice_windows, cfg.seed))
        with progress_bar(progress, None, "forced choice", "sequence") as bar:
            fc = forced_choice(model, samples, picked, pool, vocab, device, cfg.seed, cfg.batch_tokens,
                               pad_id=int(tokenizer.pad_token_id or 0), progress=bar.update)
        fc["random_window_split"] = pool_split
        fc["windows_without_context"] = len(samples) - len(with_context)
        report["forced_choice"] = fc
        report["timing_s"]["forced_choice"] = time.perf_counter() - t0
    if cfg.num_windows > 0:
        chosen = [with_context[j] for j in spread_windows([samples[i] for i in with_context], cfg.num_windows,
                                                          cfg.seed)]
        fn = complete_fn or functools.partial(complete_windows, tokens_per_bar=cfg.tokens_per_bar,
                                              sampling=sampling_config(cfg))
        with progress_bar(progress, len(chosen), "generating", "window") as bar:
            g = generative(model, tokenizer, samples, chosen, device, cfg.seed, fn, pool, progress=bar.update)
        windows = g["windows"]
        report["generative"] = summarize_generative(windows)
        report["generative"]["random_window_split"] = pool_split
        report["generative"]["sampling"] = dataclasses.asdict(sampling_config(cfg))
        report["generative"]["windows_without_context"] = len(samples) - len(with_context)
        report["generative"]["windows"] = windows
        report["timing_s"]["generation"] = g["generation_seconds"]
        plot_metric_distributions(windows, out / "metric_distributions.png")
        files.append(out / "metric_distributions.png")
        rolls = []
        for k, w in enumerate(windows[: cfg.piano_rolls]):
            name = f"pianoroll_{k:02d}.png"
            plot_piano_roll(w, out / name)
            rolls.append(name)
            files.append(out / name)
        report["plots"].update(metric_distributions="metric_distributions.png", piano_rolls=rolls)
    clean = _json_clean(report)
    write_text_atomic(out / "report.json", json.dumps(clean, indent=2))
    write_text_atomic(out / "report.html", render_html(clean))
    files += [out / "report.json", out / "report.html"]
    return EvalResult(clean, out, files)
