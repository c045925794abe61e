"""`musictrain eval`: how well a checkpoint predicts and completes held-out windows.

Three views of the same split (or of its dev or test pieces, `eval_data.piece_part`):
- teacher-forced (`eval_score`): loss, perplexity and top-1/top-5 accuracy on the completion tokens, overall
  and per token type, next to a unigram baseline (the entropy of the training completions' token distribution);
- forced choice (`eval_choice`): is the true completion more likely than the context's last bars repeated, or
  than another piece's completion, after the same prefix?
- generative (`eval_generate`): the model completes N windows from their context (the sampling `complete`
  uses) and the result is compared, with the music metrics of `metrics.py`, with the true completion and the
  context, as are two baselines: repeating the context's last bars and the completion of a random window from
  another piece.

Everything lands in one report directory (`eval_report`): report.json, report.html and the PNG plots it shows.
`run_eval` ties the parts together; the names the parts define are importable from here too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rwkv_music.atomic import write_text_atomic
from rwkv_music.remi.windows import Vocab
from rwkv_music.shards import read_manifest
from rwkv_music.train.cli_util import clear_own_files, progress_bar
from rwkv_music.train.device import pick_device
from rwkv_music.train.eval_choice import forced_choice
from rwkv_music.train.eval_data import (  # noqa: F401  (re-exported: the API of `eval` in one place)
    PIECE_PARTS,
    TEST_FRACTION,
    EvalSample,
    count_bars,
    load_split,
    piece_part,
    reservoir,
    select_pieces,
    spread_windows,
    token_types,
)
from rwkv_music.train.eval_generate import (  # noqa: F401
    SYSTEM_LABELS,
    SYSTEMS,
    CompleteFn,
    Decoded,
    complete_windows,
    decode_segments,
    generative,
    midi_roundtrip_ok,
    summarize_generative,
)
from rwkv_music.train.eval_report import (
    REPORT_FILES,
    json_clean,
    plot_loss_per_type,
    plot_metric_distributions,
    plot_piano_roll,
    render_html,
)
from rwkv_music.train.eval_score import teacher_forced, unigram_baseline


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
    min_p: float | None = None
    candidates: int | None = None
    choose: str | None = None
    seed: int = 0
    device: str = "auto"
    shard_format: str = "parquet"  # preferred; the other one is used if the build has only that
    choice_windows: int = 1000  # windows of the forced-choice test (0: off)
    pieces: str = "all"  # all | dev | test: the part of the split's pieces evaluated (see piece_part)
    fast_step: bool = True  # CUDA: generate with the fused prefill and decode kernels (False: the readable model)

    def __post_init__(self):
        if self.pieces not in PIECE_PARTS:
            raise ValueError(f"pieces must be one of {', '.join(PIECE_PARTS)}, not {self.pieces!r}")


def sampling_config(cfg: EvalConfig):
    """`complete`'s SamplingConfig with the overrides of `cfg` applied."""
    from rwkv_music.train.sampling_config import SamplingConfig

    names = [f.name for f in dataclasses.fields(SamplingConfig)]  # EvalConfig holds one override per field
    over = {k: getattr(cfg, k) for k in names if getattr(cfg, k) is not None}
    return dataclasses.replace(SamplingConfig(), **over)


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
        sampling = sampling_config(cfg)
        fn = complete_fn or functools.partial(complete_windows, tokens_per_bar=cfg.tokens_per_bar,
                                              sampling=sampling, fast_step=cfg.fast_step)
        with progress_bar(progress, len(chosen), "generating", "window") as bar:
            g = generative(model, tokenizer, samples, chosen, device, cfg.seed, fn, pool, progress=bar.update)
        windows = g["windows"]
        report["generative"] = summarize_generative(windows)
        report["generative"]["random_window_split"] = pool_split
        report["generative"]["sampling"] = {**dataclasses.asdict(sampling), "drawn": sampling.drawn}
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
    clean = json_clean(report)
    write_text_atomic(out / "report.json", json.dumps(clean, indent=2))
    write_text_atomic(out / "report.html", render_html(clean))
    files += [out / "report.json", out / "report.html"]
    return EvalResult(clean, out, files)
