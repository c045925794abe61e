"""`musictrain eval CHECKPOINT SHARDS`: the evaluation report of one checkpoint on one split."""

from __future__ import annotations

import math
from pathlib import Path

import click

from rwkv_music.train.sampling_config import CHOICES, MAX_CANDIDATES, SamplingConfig

_SAMPLING = SamplingConfig()


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="val", show_default=True, type=click.Choice(["train", "val"]),
              help="Split of SHARDS to evaluate on.")
@click.option("--num-windows", default=32, show_default=True, type=click.IntRange(min=0),
              help="Windows the model completes for the generative metrics (0: teacher-forced only).")
@click.option("--max-tf-windows", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Windows scored teacher-forced (spread over the pieces of the split).")
@click.option("--all-tf-windows", is_flag=True, help="Score every window of the split teacher-forced.")
@click.option("--choice-windows", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Windows of the forced-choice test: truth against the repeated last bars and a random "
                   "window of another piece (0: off).")
@click.option("--pieces", default="all", show_default=True, type=click.Choice(["all", "dev", "test"]),
              help="Evaluate all pieces of the split, or only its dev or test half (fixed by each piece's "
                   "identity): tune sampling on dev, report on test.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the model runs (auto: CUDA if available).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31),
              help="Seed of the window choice, the forced-choice impostors and sampling (window K samples with seed "
                   "+ K; at most 2**31: torch's generator keeps 32 bits of a seed).")
@click.option("--piano-rolls", default=4, show_default=True, type=click.IntRange(min=0),
              help="Piano-roll plots of completions next to the truth.")
@click.option("--tokens-per-bar", default=None, type=click.IntRange(min=8),
              help="Generation budget per bar [complete's default].")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help=f"Sampling temperature [complete's default, {_SAMPLING.temperature:g}].")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help=f"Nucleus sampling mass [complete's default, {_SAMPLING.top_p:g}].")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help=f"Top-k sampling [complete's default, {_SAMPLING.top_k or 'off'}].")
@click.option("--min-p", type=click.FloatRange(min=0, max=1), default=None,
              help=f"Min-p sampling [complete's default, {_SAMPLING.min_p or 'off'}].")
@click.option("--candidates", type=click.IntRange(1, MAX_CANDIDATES), default=None,
              help=f"Continuations drawn per window, one kept (--choose) [complete's default, {_SAMPLING.candidates}].")
@click.option("--choose", type=click.Choice(CHOICES), default=None,
              help=f"Which candidate is kept: likeliest or consensus [complete's default, {_SAMPLING.choose}].")
@click.option("--fast-step/--no-fast-step", default=True, show_default=True,
              help="CUDA: generate with the fused prefill and decode kernels; off: the readable model.")
@click.option("--batch-tokens", default=32768, show_default=True, type=click.IntRange(min=64),
              help="Padded tokens per teacher-forced batch.")
@click.option("--format", "shard_format", default="parquet", show_default=True,
              type=click.Choice(["parquet", "webdataset"]), help="Preferred shard format.")
@click.option("-o", "--out", "out", default=Path("eval-report"), show_default=True,
              type=click.Path(path_type=Path), help="Report directory; must be empty or new unless --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Write into a non-empty OUT: the report files there (report.*, the plots) are deleted "
                   "first, other files are left alone.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (there are none anyway when stderr is not "
              "a terminal).")
def eval_cmd(checkpoint: Path, shards: Path, split: str, num_windows: int, max_tf_windows: int,
             all_tf_windows: bool, choice_windows: int, pieces: str, device: str, seed: int, piano_rolls: int,
             tokens_per_bar: int | None,
             temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
             candidates: int | None, choose: str | None, fast_step: bool, batch_tokens: int,
             shard_format: str, out: Path, overwrite: bool, quiet: bool) -> None:
    """Evaluate CHECKPOINT (a run or checkpoint directory) on SHARDS (a `musicprep build-shards` output).

    Teacher-forced loss, perplexity and top-1/top-5 accuracy on completion tokens per token type, against a
    unigram baseline; a forced-choice test (is the true completion more likely than the context's last bars
    repeated, or than another piece's completion?); then N windows completed with `complete`'s sampling and
    compared with the true completion, the context, a repeat-the-last-bars baseline and a random window of
    another piece. Writes OUT/report.json, OUT/report.html and its plots.
    """
    from rwkv_music.shards import ManifestError
    from rwkv_music.train.checkpoints import load_for_inference
    from rwkv_music.train.cli import UsageFailure
    from rwkv_music.train.cli_util import check_out_dir, progress_enabled
    from rwkv_music.train.device import pick_device
    from rwkv_music.train.evaluate import EvalConfig, run_eval

    try:
        check_out_dir(out, overwrite)
    except ValueError as e:
        raise UsageFailure(str(e)) from None
    cfg = EvalConfig(split=split, num_windows=num_windows, max_tf_windows=None if all_tf_windows else max_tf_windows,
                     batch_tokens=batch_tokens, piano_rolls=piano_rolls, seed=seed, device=device,
                     shard_format=shard_format, tokens_per_bar=tokens_per_bar, temperature=temperature,
                     top_p=top_p, top_k=top_k, min_p=min_p, candidates=candidates, choose=choose,
                     choice_windows=choice_windows,
                     pieces=pieces, fast_step=fast_step)
    try:
        dev = pick_device(device)
    except RuntimeError as e:
        raise UsageFailure(str(e)) from e
    try:
        model, tokenizer, info = load_for_inference(checkpoint, dev)
    except (FileNotFoundError, ValueError) as e:
        raise UsageFailure(f"cannot load the checkpoint: {e}") from e
    try:
        res = run_eval(model, tokenizer, shards, out, cfg, checkpoint_label=str(info["checkpoint"]),
                       tokenizer_hash=info.get("tokenizer_hash"), overwrite=overwrite,
                       progress=progress_enabled(quiet))
    except (ManifestError, FileNotFoundError) as e:
        raise UsageFailure(f"cannot read the shards: {e}") from e
    except ValueError as e:
        raise UsageFailure(str(e)) from e
    r = res.report
    tf, uni = r["teacher_forced"], r["unigram"]
    part = "" if pieces == "all" else f" ({pieces} pieces)"
    click.echo(f"teacher-forced on {tf['windows']} {split}{part} windows ({tf['tokens']} completion tokens): loss "
               f"{_f(tf['loss'])} nats (unigram entropy {_f(uni['entropy_train'])}), perplexity "
               f"{_f(tf['perplexity'], 2)}, top-1 {_f(tf['top1'])}, top-5 {_f(tf['top5'])}")
    fc = r.get("forced_choice")
    if fc:
        from .eval_choice import IMPOSTORS  # here: `musictrain --help` loads no torch

        c = fc["comparisons"]
        parts = [f"{name} {c[name]['truth_first']}/{c[name]['n']} = {_f(c[name]['share'])}"
                 + (f" (goal {c[name]['goal']:.2f})" if c[name]["goal"] is not None else "")
                 for name in IMPOSTORS]
        click.echo(f"forced choice on {fc['windows']} windows, truth ranked first against: " + ", ".join(parts))
    g = r.get("generative")
    if g:
        s = g["systems"]
        click.echo(f"generated {g['n_windows']} completions: valid MIDI {_f(g['valid_midi_rate'])}, pitch-class "
                   f"distance to the truth: model {_f(s['model']['pch_distance_truth']['mean'])}, repeat "
                   f"{_f(s['repeat']['pch_distance_truth']['mean'])}, random "
                   f"{_f(s['random']['pch_distance_truth']['mean'])}")
        for base in ("repeat", "random"):
            click.echo(f"  closer to the truth than the {base}: {_standing(g, base)}")
    click.echo(f"report: {res.out_dir / 'report.html'} and {res.out_dir / 'report.json'}")


def _standing(g: dict, base: str) -> str:
    """'A of 9 metrics by mean error; per window B of them significantly (sign test p < 0.05), C the other way'."""
    from .eval_generate import mean_error_wins
    from .metrics import METRIC_NAMES

    err = {k: g["systems"][k]["abs_error_vs_truth"] for k in ("model", base)}
    by_mean = mean_error_wins(*({m: err[k][m]["mean"] for m in METRIC_NAMES} for k in ("model", base)))
    per = g[f"model_vs_{base}"]
    sig = [per[m] for m in METRIC_NAMES if per[m]["sign_test_p"] < 0.05]
    won = sum(v["model_closer"] > v["base_closer"] for v in sig)
    return (f"{by_mean} of {len(METRIC_NAMES)} metrics by mean error; per window {won} of them significantly "
            f"(sign test p < 0.05), {len(sig) - won} significantly the other way")


if __name__ == "__main__":
    eval_cmd()
