"""`musictrain complete CHECKPOINT PROMPT.mid -o OUT`: the piano copilot on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from rwkv_music.train.cli import UsageFailure
from rwkv_music.train.sampling_config import CHOICES, MAX_CANDIDATES, SamplingConfig

_SAMPLING = SamplingConfig()


def _context_bars(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of bars or 'all', got {value!r}",
                                 param_hint="'--context-bars'") from None
    if n < 1:
        raise click.BadParameter(f"must be at least 1 (or 'all'), got {n}", param_hint="'--context-bars'")
    return n


OWN_FILES = ("sample-*.mid", "sample-*.png")  # what `complete` writes, and all --overwrite clears


@click.command("complete", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("prompt", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (sample-K.mid, sample-K-continuation.mid, sample-K.png); must be empty or "
                   "new unless --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Write into a non-empty OUT: its sample-* files (an earlier run's) are deleted first, "
                   "other files are left alone.")
@click.option("--bars", type=click.IntRange(min=1), default=2, show_default=True, help="Bars to add.")
@click.option("--context-bars", default="4", show_default=True,
              help="How many of the prompt's last bars condition the model, or 'all'.")
@click.option("--first-bar", type=click.IntRange(min=0), default=0, show_default=True,
              help="The prompt's first bar number in the piece (0: the prompt is the piece's opening). Models trained "
                   "on shards built with --bar-phase are told the phrase position of the first context bar from it; "
                   "others ignore it.")
@click.option("--num-samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="Variations, at most 10000 per call. Each candidate is a decoded row, and rows are decoded in "
                   "batches of up to 256: 16 samples a batch with 16 candidates.")
@click.option("--temperature", type=click.FloatRange(min=0), default=_SAMPLING.temperature, show_default=True,
              help="Softmax temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=_SAMPLING.top_p, show_default=True,
              help="Nucleus sampling: draw from the most likely tokens that make up this probability mass.")
@click.option("--top-k", type=click.IntRange(min=0), default=_SAMPLING.top_k, show_default=True,
              help="Draw from the K most likely tokens only (0 = off).")
@click.option("--min-p", type=click.FloatRange(min=0, max=1), default=_SAMPLING.min_p, show_default=True,
              help="Draw only from tokens at least this fraction as likely as the most likely one (0 = off).")
@click.option("--candidates", type=click.IntRange(1, MAX_CANDIDATES), default=_SAMPLING.candidates, show_default=True,
              help="Draw this many continuations for each sample and keep one (see --choose); C times the "
                   "decoding work, so 1 (off) is the fast choice. With --temperature 0, --top-k 1 or --min-p 1 every "
                   "candidate would be the same, and one is drawn.")
@click.option("--choose", type=click.Choice(CHOICES), default=_SAMPLING.choose, show_default=True,
              help="With --candidates: keep the consensus (the candidate whose notes, range, density, rhythm and "
                   "scale are nearest to the other candidates': the most typical of what the model drew; closer to "
                   "the truth on the music21 build, docs/results.md), or the likeliest (the model's mean "
                   "log-probability per token, temperature 1).")
@click.option("--seed", type=click.IntRange(0, 2**31), default=0, show_default=True,
              help="Sample K uses seed + K (with --candidates, its candidate c > 0 seed + K + c * 2**20). At most "
                   "2**31: torch's generator keeps 32 bits of a seed, so larger ones would repeat smaller ones.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Token budget per sample [384 per bar]; samples are closed off to fit.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs (auto: CUDA if available).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights and activations dtype (the WKV state stays float32). auto: "
              "bfloat16 on CUDA (the training precision; the fused prefill runs about 2x faster than in float32), "
              "float32 on the CPU.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="Capture the decode step as a CUDA graph (CUDA only).")
@click.option("--fast-step/--no-fast-step", default=True, show_default=True,
              help="CUDA: run the prefill and the model step as fused kernels (13 and seven launches per layer); "
                   "off: the readable model (the reference the fused kernels are tested against).")
@click.option("--compile", "compile_step", is_flag=True,
              help="torch.compile the readable decode step instead of the fused one (a compile of tens of "
                   "seconds first; kept for comparison).")
@click.option("--plot", is_flag=True, help="Also write a piano-roll PNG per sample.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none anyway when stderr is not a "
              "terminal).")
def complete(checkpoint: Path, prompt: Path, out: Path, overwrite: bool, bars: int, context_bars: str,
             first_bar: int, num_samples: int, temperature: float, top_p: float, top_k: int, min_p: float,
             candidates: int, choose: str, seed: int,
             max_tokens: int | None, device: str, dtype: str, cuda_graph: bool, fast_step: bool, compile_step: bool,
             plot: bool, quiet: bool) -> None:
    """Continue PROMPT (a MIDI file) by --bars bars with the model in CHECKPOINT (a run directory: its best
    checkpoint, else the latest; or one checkpoint directory)."""
    import torch

    from rwkv_music.train.checkpoints import load_for_inference
    from rwkv_music.train.cli_util import check_out_dir, progress_bar, progress_enabled
    from rwkv_music.train.complete import MAX_SAMPLES, CompleteConfig, CompletionError
    from rwkv_music.train.complete import complete as run_complete
    from rwkv_music.train.complete_output import format_table, write_completion
    from rwkv_music.train.device import DeviceUnavailable, pick_device

    ctx = _context_bars(context_bars)
    if num_samples > MAX_SAMPLES:  # before the model loads: CompleteConfig says the same, later
        again = (f"run again with --seed {seed + MAX_SAMPLES} and another -o (sample k uses seed + k)"
                 if seed + MAX_SAMPLES <= 2**31 else
                 f"run in parts of up to {MAX_SAMPLES} from a lower --seed, each with its own -o (sample k uses "
                 "seed + k, and seeds stop at 2**31)")
        raise UsageFailure(f"--num-samples {num_samples}: at most {MAX_SAMPLES} per call (every sample is held in "
                           f"memory until all are written); for more, {again}")
    try:
        device = str(pick_device(device))
    except DeviceUnavailable as e:
        raise UsageFailure(str(e)) from None
    if not prompt.is_file():
        raise UsageFailure(f"prompt not found: {prompt}")
    try:
        check_out_dir(out, overwrite)
    except ValueError as e:
        raise UsageFailure(str(e)) from None
    try:
        model, tokenizer, info = load_for_inference(checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageFailure(_one_line(f"cannot load checkpoint {checkpoint}: {e}")) from None
    try:
        config = CompleteConfig(bars=bars, context_bars=ctx, num_samples=num_samples,
                                sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, candidates=candidates, choose=choose),
                                seed=seed,
                                max_new_tokens=max_tokens, cuda_graph=cuda_graph, compile_step=compile_step,
                                fast_step=fast_step, first_bar=first_bar)
    except ValueError as e:
        raise UsageFailure(str(e)) from None
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    with progress_bar(progress_enabled(quiet), bars * num_samples, "generating", "bar") as bar:
        def on_step(tokens: int, done: list[int]) -> None:
            bar.update(sum(done) - bar.n)
            per = ("bars per sample " + "/".join(map(str, done)) if len(done) <= 16
                   else f"samples done {sum(d >= bars for d in done)}/{len(done)}")  # one line, whatever the count
            bar.set_postfix_str(f"tokens {tokens}/{config.budget}, {per}", refresh=False)

        try:
            completion = run_complete(model, tokenizer, prompt, config, progress=on_step)
        except (CompletionError, ValueError) as e:
            raise UsageFailure(_one_line(f"{prompt}: {e}")) from None
        bar.refresh()  # the final counts, even when generation took less than tqdm's refresh interval
    write_completion(completion, out, plot=plot, clear=OWN_FILES if overwrite else ())
    click.echo(f"checkpoint {info['checkpoint']} (step {info.get('step')}, {dtype} on {device}), prompt {prompt}: "
               f"{len(completion.window.tokens)} prompt tokens, {bars} new bar(s) per sample -> {out}")
    click.echo(format_table(completion))


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())
