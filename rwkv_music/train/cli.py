"""`musictrain`: train (fit), complete and evaluate. Heavy imports (torch, miditok) happen inside commands.

Adding a command defined in another module is one line at the bottom of this file::

    main.add_command(lazy("rwkv_music.train.complete:complete", "complete", "Continue a MIDI file."))

`lazy` registers a stand-in that imports the module only when the command runs (or prints its own help),
so `musictrain --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import click


class UsageFailure(click.ClickException):
    """Bad arguments or input: one line, exit code 2, nothing written."""

    exit_code = 2


class _LazyCommand(click.Command):
    """A command whose real definition (``module:attr``) is imported on first use."""

    def __init__(self, target: str, name: str, short_help: str):
        super().__init__(name, help=short_help, short_help=short_help)
        self._target = target
        self._real: click.Command | None = None

    def _load(self) -> click.Command:
        if self._real is None:
            mod, attr = self._target.split(":")
            self._real = getattr(importlib.import_module(mod), attr)
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        return self._load().make_context(info_name, args, parent=parent, **extra)

    def get_params(self, ctx):  # type: ignore[override]
        return self._load().get_params(ctx)


def lazy(target: str, name: str, short_help: str) -> click.Command:
    """A stand-in for the click command `target` ("package.module:attr")."""
    return _LazyCommand(target, name, short_help)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rwkv-music")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="musictrain", message="%(prog)s %(version)s")
def main() -> None:
    """Train an RWKV-7 model on music shards, complete MIDI files, evaluate (see docs/training.md)."""


def _default_text(field: str, unset: str | None) -> str:
    """How `--help` shows TrainConfig's default of `field` (read from the dataclass, so it cannot drift)."""
    from .config import TrainConfig

    value = TrainConfig.__dataclass_fields__[field].default
    if value is None:
        if unset is None:
            raise ValueError(f"TrainConfig.{field} defaults to None: say what that means (unset=...)")
        return unset
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _opt(*names: str, help: str, field: str | None = None, unset: str | None = None, **kw: Any):
    """An option of a TrainConfig field whose absence means 'not given' (None), so the config file or the saved
    run config applies; its help ends with the field's default. `unset` says what a None default means."""
    if field is None:
        long = next(n for n in names if n.startswith("--"))
        field = long[2:].split("/")[0].replace("-", "_")
    kw.setdefault("default", None)
    kw.setdefault("show_default", False)
    return click.option(*names, help=f"{help} [default: {_default_text(field, unset)}]", **kw)


@main.command("fit")
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML (or JSON) file of TrainConfig keys; options given here override it.")
@_opt("--preset", type=click.Choice(["tiny", "small", "base", "large"]), help="Model size.")
@_opt("--n-layer", type=int, help="Override the preset's layer count.", unset="the preset's")
@_opt("--n-embd", type=int, help="Override the preset's width.", unset="the preset's")
@_opt("--head-size", type=int, help="Override the preset's head size.", unset="the preset's")
@_opt("--max-steps", type=int, help="Optimiser steps to train.", unset="one epoch")
@_opt("--max-tokens", type=int, help="Stop after this many (global, unpadded) input tokens.", unset="no limit")
@_opt("--batch-size", type=int, help="Samples per process per micro-step (padded batches).")
@_opt("--batch-tokens", type=int, help="Packed batches: windows back to back in rows of --pack-len positions, this "
      "many positions per process per micro-step (no padding; replaces --batch-size).", unset="off")
@_opt("--pack-len", type=int, help="Positions per packed row; at least the build's longest window.")
@_opt("--grad-accum", type=int, help="Micro-steps per optimiser step.")
@_opt("--lr", type=float, help="Peak learning rate.")
@_opt("--lr-final", type=float, help="Final learning rate of the cosine decay.")
@_opt("--warmup-steps", type=int, help="Linear warm-up steps.")
@_opt("--weight-decay", type=float, help="AdamW weight decay on 2-D weight matrices.")
@_opt("--adam-eps", type=float, help="AdamW eps (RWKV-LM's value; 1e-8 is the conservative one).")
@_opt("--grad-clip", type=float, help="Gradient norm clip.")
@_opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: CUDA if available.")
@_opt("--seed", type=int, help="Seed of model init and data order.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its latest checkpoint (its config.json "
              "is the base; options given here override it).")
@click.option("--accept-new-data", is_flag=True, help="With --resume: continue although SHARDS is another build "
              "than the run trained on (the data order then is the new build's).")
@_opt("--init-from", type=click.Path(exists=True, path_type=Path),
      help="Start from an RWKV-LM x070 .pth (vocabulary resized) or a run / checkpoint directory.",
      unset="a fresh model")
@_opt("--eval-every", type=int, help="Evaluate on the val split every N steps.")
@_opt("--eval-batches", type=int, help="Limit evaluation to N batches per process.", unset="all")
@_opt("--eval-batch-size", type=int, help="Batch size of evaluation.", unset="--batch-size")
@_opt("--save-every", type=int, help="Checkpoint every N steps (and at the end).")
@_opt("--keep-last", type=int, help="Checkpoints to keep besides the best.")
@_opt("--log-every", type=int, help="Write metrics every N steps.")
@_opt("--format", "format", type=click.Choice(["parquet", "webdataset"]), help="Shard format to read.")
@_opt("--num-workers", type=int, help="DataLoader worker processes per GPU process.")
@_opt("--streams", type=int, help="Sample streams per process: 1 process with --streams K sees the data of K "
      "DDP processes.")
@_opt("--shuffle-buffer", type=int, help="Samples in each stream's shuffle buffer.")
@_opt("--mix-shards", type=int, help="Shards each stream reads at once, each next window drawn from one of them "
      "at random, so a batch mixes pieces from across the corpus (a shard holds each piece's windows together; in "
      "builds made before 2026-12-07 a shard may hold a single collection). 1: shard after shard.")
@_opt("--transpose", type=int, help="Key augmentation: move each training window by a random number of semitones "
      "within +-N (only shifts that keep every pitch on the keyboard; validation is never moved). 0: off.")
@_opt("--bucket-pool", type=int, help="Batches per length-bucketing pool; 1 disables bucketing.")
@_opt("--repeat-contrast", type=float, help="Weight of a term that teaches where music does not "
      "replay its last bars: each training window is also scored with its context's last bars repeated as the "
      "completion (eval's forced-choice impostor), and the true completion is pushed to lead it by "
      "--repeat-margin nats per token. About doubles the work per window; raises eval's forced choice against "
      "the repeat at some cost in teacher-forced loss (docs/training.md). 0: off.")
@_opt("--repeat-margin", type=float, help="With --repeat-contrast: the lead in mean log-likelihood "
      "per token (nats) beyond which a window's truth is no longer pushed above its repeat.")
@_opt("--recompute", type=click.Choice(["none", "elementwise", "blocks"]), help="What backward recomputes "
      "instead of keeping: elementwise keeps the matrix products' outputs (and, where bf16, their inputs) and the "
      "WKV kernels' outputs and runs the other element-wise work again (less activation memory, a little more "
      "backward work); blocks "
      "keeps only each block's input (least memory, the most work). On one GPU the default is elementwise with "
      "--precision bf16-weights: base preset at B16 T2048 in 19.4 GiB, where bf16 autocast keeping everything "
      "takes 29.5; docs/training.md says more.",
      unset="elementwise on one CUDA process without --grad-accum, else none")
@_opt("--grad-checkpoint/--no-grad-checkpoint", help="The older spelling of --recompute blocks (or none).",
      unset="--recompute decides")
@_opt("--compile/--no-compile", help="torch.compile the model (fuses its element-wise work around the CUDA WKV "
      "kernel: about 2.4x faster steps on an H200; the first step waits for the compile).",
      unset="on with CUDA, off on the CPU")
@_opt("--memory-budget", type=click.FloatRange(0, 1), help="With --compile: the share of activation memory the "
      "compiled step may keep for backward; below 1 it recomputes element-wise work instead (less memory, "
      "somewhat slower steps: docs/training.md).",
      unset="keep all (1)")
@_opt("--precision", type=click.Choice(["bf16", "bf16-weights", "fp32"]), help="bf16: bf16 autocast over fp32 "
      "weights on CUDA (the CPU runs fp32); bf16-weights: a bf16 copy of the weights computes without autocast, "
      "as RWKV-LM trains, while AdamW steps fp32 master weights (checkpoints hold those); fp32: fp32 throughout "
      "(the reference path).",
      unset="bf16-weights on one CUDA process without --grad-accum, else bf16")
@_opt("--progress/--no-progress", help="Progress bar on stderr.")
@_opt("--tensorboard/--no-tensorboard", help="TensorBoard event files in OUT/tb.")
def fit_cmd(shards: Path, out: Path, config_file: Path | None, resume: bool, accept_new_data: bool,
            **opts: Any) -> None:
    """Train on the shards in SHARDS (a `musicprep build-shards` output), writing the run to OUT.

    Run it under `torchrun --nproc-per-node K` for DDP over K GPUs (or K CPU processes with gloo).
    The first Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits (130 / 143);
    a second one stops at once. Exit codes: 2 bad input or arguments, 1 a training failure.
    """
    from rwkv_music.shards.dataset import DataError

    from .config import load_run_config, resolve
    from .fit import BadFitInput, TrainingError, fit
    from .stop import StopNow, exit_code, signal_name

    if accept_new_data and not resume:
        raise UsageFailure("--accept-new-data only applies with --resume")
    overrides = {k: v for k, v in opts.items() if v is not None}
    overrides["shards"], overrides["out"] = str(shards), str(out)
    if overrides.get("init_from") is not None:
        overrides["init_from"] = str(overrides["init_from"])
    base = None
    try:
        if resume and (out / "config.json").is_file():
            base = load_run_config(out)["train"]
        cfg = resolve(config_file, overrides, base)
    except (ValueError, TypeError) as e:
        raise UsageFailure(f"bad configuration: {e}") from e
    main_rank = os.environ.get("RANK", "0") == "0"
    shape = [k for k in ("preset", "n_layer", "n_embd", "head_size", "dim_ffn") if k in overrides]
    if shape and main_rank:
        from .checkpoints import latest_checkpoint

        if cfg.init_from or (resume and latest_checkpoint(out) is not None):
            click.echo(f"note: {', '.join('--' + k.replace('_', '-') for k in shape)} ignored: the model's shape "
                       f"comes from {'--init-from' if cfg.init_from else 'the run being resumed'}", err=True)
    try:
        res = fit(cfg, resume=resume, accept_new_data=accept_new_data)
    except (DataError, BadFitInput) as e:
        raise UsageFailure(str(e)) from e
    except TrainingError as e:
        raise click.ClickException(str(e)) from e
    except StopNow as e:
        if main_rank:
            click.echo(f"Error: {e}; the step in progress was not saved, the latest checkpoint in {out} stays: "
                       f"continue with `musictrain fit {shards} -o {out} --resume`", err=True)
        raise SystemExit(exit_code(e.signum)) from None
    if res.stopped_by is not None:
        if main_rank:
            click.echo(f"stopped by {signal_name(res.stopped_by)} at step {res.step}; checkpoint {res.checkpoint}. "
                       f"Continue with: musictrain fit {shards} -o {out} --resume", err=True)
        raise SystemExit(exit_code(res.stopped_by))
    if res.step and res.loss is not None and main_rank:
        val = f", val loss {res.val_loss:.4f}" if res.val_loss is not None else ""
        click.echo(f"step {res.step}: loss {res.loss:.4f}{val}; run in {res.run_dir}", err=True)


# Commands of other modules: one line each (imported only when used).
main.add_command(lazy("rwkv_music.train.eval_cli:eval_cmd", "eval",
                      "Evaluation report of a checkpoint on a shard split."))
main.add_command(lazy("rwkv_music.train.complete_cli:complete", "complete", "Continue a MIDI file by a few bars."))


if __name__ == "__main__":
    main()
