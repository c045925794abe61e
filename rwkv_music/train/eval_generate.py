"""The generative part of `eval`: the model completes windows; its completions and two baselines (the context's
last bars repeated, a random window of another piece) are compared with the truth by the music metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import symusic
import torch

from rwkv_music.remi.windows import Vocab, decode_window
from rwkv_music.train import metrics as M
from rwkv_music.train.eval_data import EvalSample, count_bars

SYSTEMS = ("model", "repeat", "random")  # generated, repeat-last-bars baseline, random-window baseline


SYSTEM_LABELS = {"model": "model", "repeat": "repeat last bars", "random": "random window", "truth": "ground truth",
                 "context": "context", "earlier": "repeat earlier bars"}


# A completion function with the signature of `complete_windows`: (model, tokenizer, prompts [meta + context
# tokens], meta_lens, bars per prompt, *, device, seed[, progress]) -> the continuation tokens per prompt, or the
# Exception of a prompt that failed; `progress(1)`, when passed, is called after each prompt.
CompleteFn = Callable[..., list]


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
                     tokens_per_bar: int | None = None, sampling=None, fast_step: bool = True,
                     progress: Callable[[int], None] | None = None) -> list:
    """Continue each window prompt (meta + context tokens, exactly as in training) by its number of bars.

    Uses `complete`'s decoder, grammar, token budget and (unless `sampling`, a SamplingConfig, is given)
    default sampling; one sample per window, window k seeded with seed + k. A window that fails yields its
    exception instead of tokens. `fast_step`: as in `generate`.
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
                            cuda_graph=cfg.cuda_graph, fast_step=fast_step, tokenizer=tokenizer)
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
    out["model_vs_random"] = closer_than(windows, "random")
    out["model_vs_repeat"] = closer_than(windows, "repeat")
    return out


def mean_error_wins(model: dict[str, float | None], base: dict[str, float | None]) -> int:
    """Metrics (keys of `model`) where the model's mean error against the truth is below the baseline's: the count
    issue 16 states its goals in. A metric with no mean (None: no window defines it, or NaN in a written report)
    is no win for either side."""
    return sum(model[m] is not None and base.get(m) is not None and model[m] < base[m] for m in model)


def closer_than(windows: list[dict], base: str) -> dict:
    """Per metric, window by window: is the model's completion closer to the truth than the baseline `base`'s?
    `model_closer_rate` (ties count half), the counts, and the exact two-sided sign test of the untied windows:
    a mean error over 64 windows can favour either side by chance, and this says how often."""
    out = {}
    for m in (*M.METRIC_NAMES, "pch_distance_truth"):
        closer = further = ties = 0
        for w in windows:
            mm, bb = w["metrics"].get("model"), w["metrics"].get(base)
            if mm is None or bb is None:
                continue
            if m == "pch_distance_truth":
                em, eb = w["pch_distance"]["model"]["truth"], w["pch_distance"][base]["truth"]
            else:
                em, eb = abs(mm[m] - w["metrics"]["truth"][m]), abs(bb[m] - w["metrics"]["truth"][m])
            if math.isfinite(em) and math.isfinite(eb):
                closer, further, ties = closer + (em < eb), further + (em > eb), ties + (em == eb)
        n = closer + further + ties
        out[m] = {"n": n, "model_closer_rate": (closer + 0.5 * ties) / n if n else float("nan"),
                  "model_closer": closer, "base_closer": further, "ties": ties,
                  "sign_test_p": M.sign_test(closer, further)}
    return out
