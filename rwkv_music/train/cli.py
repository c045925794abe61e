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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train an RWKV-7 model on music shards, complete MIDI files, evaluate (see docs/training.md)."""


def _opt(*names: str, **kw: Any):
    """An option whose absence means 'not given' (None), so the config file / saved run config applies."""
    kw.setdefault("default", None)
    kw.setdefault("show_default", False)
    return click.option(*names, **kw)


@main.command("fit")
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@_opt("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      help="TOML (or JSON) file of TrainConfig keys; options given here override it.")
@_opt("--preset", type=click.Choice(["tiny", "small", "base", "large"]), help="Model size [tiny].")
@_opt("--n-layer", type=int, help="Override the preset's layer count.")
@_opt("--n-embd", type=int, help="Override the preset's width.")
@_opt("--head-size", type=int, help="Override the head size [64].")
@_opt("--max-steps", type=int, help="Optimiser steps to train [one epoch].")
@_opt("--max-tokens", type=int, help="Stop after this many (global, unpadded) input tokens.")
@_opt("--batch-size", type=int, help="Samples per process per micro-step [16].")
@_opt("--batch-tokens", type=int, help="Pack windows back to back into rows of --pack-len positions, this many "
      "positions per process per micro-step (no padding; replaces --batch-size) [off].")
@_opt("--pack-len", type=int, help="Positions per packed row; at least the build's longest window [2048].")
@_opt("--grad-accum", type=int, help="Micro-steps per optimiser step [1].")
@_opt("--lr", type=float, help="Peak learning rate [6e-4].")
@_opt("--lr-final", type=float, help="Final learning rate of the cosine decay [6e-5].")
@_opt("--warmup-steps", type=int, help="Linear warm-up steps [100].")
@_opt("--weight-decay", type=float, help="AdamW weight decay on 2-D weight matrices [0.1].")
@_opt("--adam-eps", type=float, help="AdamW eps [1e-18, as RWKV-LM].")
@_opt("--grad-clip", type=float, help="Gradient norm clip [1.0].")
@_opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[auto]: CUDA if available.")
@_opt("--seed", type=int, help="Seed of model init and data order [0].")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its latest checkpoint.")
@_opt("--init-from", type=click.Path(exists=True, path_type=Path),
      help="Start from an RWKV-LM x070 .pth (vocabulary resized) or a run / checkpoint directory.")
@_opt("--eval-every", type=int, help="Evaluate on the val split every N steps [500].")
@_opt("--eval-batches", type=int, help="Limit evaluation to N batches per process [all].")
@_opt("--eval-batch-size", type=int, help="[batch size]")
@_opt("--save-every", type=int, help="Checkpoint every N steps [1000] (and at the end).")
@_opt("--keep-last", type=int, help="Checkpoints to keep besides the best [3].")
@_opt("--log-every", type=int, help="Write metrics every N steps [10].")
@_opt("--format", "format", type=click.Choice(["parquet", "webdataset"]), help="Shard format to read [parquet].")
@_opt("--num-workers", type=int, help="DataLoader worker processes per GPU process [0].")
@_opt("--streams", type=int, help="Sample streams per process: 1 process with --streams K sees the data of K "
      "DDP processes [1].")
@_opt("--shuffle-buffer", type=int, help="Samples in each stream's shuffle buffer [2048].")
@_opt("--bucket-pool", type=int, help="Batches per length-bucketing pool; 1 disables bucketing [8].")
@_opt("--grad-checkpoint/--no-grad-checkpoint", help="Recompute blocks in backward (less memory).")
@_opt("--compile/--no-compile", help="torch.compile the model.")
@_opt("--progress/--no-progress", help="Progress bar [on].")
@_opt("--tensorboard/--no-tensorboard", help="TensorBoard event files in OUT/tb [on].")
def fit_cmd(shards: Path, out: Path, config_file: Path | None, resume: bool, **opts: Any) -> None:
    """Train on the shards in SHARDS (a `musicprep build-shards` output), writing the run to OUT.

    Run it under `torchrun --nproc-per-node K` for DDP over K GPUs (or K CPU processes with gloo).
    """
    from rwkv_music.shards.dataset import DataError

    from .config import load_run_config, resolve
    from .fit import TrainingError, fit

    overrides = {k: v for k, v in opts.items() if v is not None}
    overrides["shards"], overrides["out"] = str(shards), str(out)
    if overrides.get("init_from") is not None:
        overrides["init_from"] = str(overrides["init_from"])
    base = None
    if resume and (out / "config.json").is_file():
        base = load_run_config(out)["train"]
    try:
        cfg = resolve(config_file, overrides, base)
    except (ValueError, TypeError) as e:
        raise UsageFailure(f"bad configuration: {e}") from e
    try:
        res = fit(cfg, resume=resume)
    except DataError as e:
        raise UsageFailure(str(e)) from e
    except TrainingError as e:
        raise click.ClickException(str(e)) from e
    if res.step and res.loss is not None and os.environ.get("RANK", "0") == "0":
        val = f", val loss {res.val_loss:.4f}" if res.val_loss is not None else ""
        click.echo(f"step {res.step}: loss {res.loss:.4f}{val}; run in {res.run_dir}", err=True)


# Commands of other modules: one line each (imported only when used).
main.add_command(lazy("rwkv_music.train.eval_cli:eval_cmd", "eval",
                      "Evaluation report of a checkpoint on a shard split."))
main.add_command(lazy("rwkv_music.train.complete_cli:complete", "complete", "Continue a MIDI file by a few bars."))


if __name__ == "__main__":
    main()
