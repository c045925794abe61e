"""`musictrain fit` stopped by real signals, its exit codes, the resume checks, file modes, --version and --help.

Signals go to a real `musictrain fit` subprocess once metrics.jsonl shows it training; the resumed run must log
the losses of an uninterrupted one (fit_testutil.assert_same_losses, as the SIGKILL test in test_fit.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from fit_testutil import (
    SMALL_BUILD_ARGS,
    TINY,
    assert_same_losses,
    children,
    fit_env,
    metrics,
    musictrain,
    musictrain_here,
    torchrun_fit,
)

from rwkv_music.model import load
from rwkv_music.train.checkpoints import latest_checkpoint, read_trainer_state
from rwkv_music.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread (conftest.py)

STEPS = 40
# save-every 25: a stop between saves must write its own checkpoint to resume exactly
ARGS = (*TINY, "--batch-size", "8", "--max-steps", str(STEPS), "--lr", "3e-3", "--warmup-steps", "5",
        "--eval-every", "20", "--eval-batches", "2", "--save-every", "25", "--log-every", "1",
        "--shuffle-buffer", "256")


def start_fit(shards: Path, run: Path, *args: str, stderr_to: Path, cmd_prefix: tuple[str, ...] = ()
              ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", *cmd_prefix, "rwkv_music.train.cli", "fit", str(shards), "-o", str(run), *args]
    with open(stderr_to, "w") as err:
        return subprocess.Popen(cmd, env=fit_env(run.parent), stdout=subprocess.DEVNULL, stderr=err)


def wait_for_training(proc: subprocess.Popen, run: Path, rows: int = 3, timeout: float = 300) -> int:
    """Block until metrics.jsonl has `rows` records (the run is in its loop); returns the last step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            seen = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        except (FileNotFoundError, json.JSONDecodeError):
            seen = []
        if len(seen) >= rows:
            return seen[-1]["step"]
        time.sleep(0.02)
    raise AssertionError(f"the run did not start training (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def whole_run(small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("whole") / "run"
    musictrain("fit", small_shards, "-o", run, *ARGS)
    return run


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_saves_the_step_and_resume_gives_the_uninterrupted_losses(
        sig: signal.Signals, code: int, small_shards: Path, whole_run: Path, tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_fit(small_shards, run, *ARGS, stderr_to=log)
    seen = wait_for_training(proc, run)
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == code, log.read_text()[-3000:]
    err = log.read_text()
    assert "Traceback" not in err and "Aborted!" not in err, err[-3000:]
    last = max(r["step"] for r in metrics(run))
    assert seen <= last < STEPS
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and read_trainer_state(ckpt).step == last  # the finished step was saved
    assert f"stopped by {sig.name} at step {last}" in err
    assert f"musictrain fit {small_shards} -o {run} --resume" in err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left

    musictrain("fit", small_shards, "-o", run, *ARGS, "--resume")
    assert_same_losses(whole_run, run, STEPS)


def test_second_signal_stops_at_once(small_shards: Path, tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_fit(small_shards, run, *ARGS, stderr_to=log)
    wait_for_training(proc, run)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # before the step in progress can end: the second request
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    err = log.read_text()
    assert "stopped at once by a second signal (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    assert "--resume" in err
    ckpts = run / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux /proc/PID/task/PID/children to find the worker processes")
def test_ddp_every_rank_stops_at_the_step_one_rank_was_signalled_at(small_shards: Path, tmp_path: Path):
    steps = 12
    common = (*TINY, "--max-steps", str(steps), "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "6",
              "--eval-batches", "2", "--save-every", "12", "--log-every", "1", "--shuffle-buffer", "256")
    torchrun = ("torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")
    ddp, log = tmp_path / "ddp", tmp_path / "stderr.txt"
    proc = start_fit(small_shards, ddp, "--batch-size", "4", *common, stderr_to=log, cmd_prefix=torchrun)
    wait_for_training(proc, ddp, rows=2)
    workers = {_rank_of(c): c for c in children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 (which saves) must learn of it by the all-reduce
    proc.wait(timeout=300)
    err = log.read_text()
    last = max(r["step"] for r in metrics(ddp))
    assert last < steps, err[-3000:]
    ckpt = latest_checkpoint(ddp)
    assert ckpt is not None and read_trainer_state(ckpt).step == last, err[-3000:]
    assert f"stopped by SIGTERM at step {last}" in err  # printed by rank 0, which got no signal itself
    # both ranks left with 143 (torchrun reports the workers' exit codes)
    assert "exitcode  : 143" in err or "exit code 143" in err or "exitcode: 143" in err, err[-3000:]

    res = torchrun_fit(small_shards, ddp, "--batch-size", "4", *common, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    one = tmp_path / "one"  # one process with --streams 2 trains on the same global batches (test_fit.py)
    musictrain("fit", small_shards, "-o", one, "--batch-size", "8", "--streams", "2", *common)
    a, b = metrics(one), metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert y["tokens"] == x["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]


def test_usage_errors_exit_2_and_runtime_failures_1(small_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = (*TINY, "--batch-size", "4", "--max-steps", "1", "--eval-batches", "1")
    assert musictrain_here("fit", small_shards, "-o", run, *args).exit_code == 0
    for extra, says in [((), "already holds a run; add --resume"),
                        (("--resume", "--batch-size", "8"), "--resume with changed batch_size"),
                        (("--accept-new-data",), "--accept-new-data only applies with --resume")]:
        res = musictrain_here("fit", small_shards, "-o", run, *args, *extra)
        assert res.exit_code == 2 and says in res.output, (extra, res.output)
        assert len([line for line in res.output.splitlines() if line.startswith("Error:")]) == 1
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "big", *TINY, "--batch-size", "100000")
    assert res.exit_code == 2 and "lower --batch-size" in res.output, res.output
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    (tmp_path / "notes.txt").write_text("hello\nthis is a text file, not a model\n")
    torch.save({"step": 3}, tmp_path / "other.pth")  # a real torch file, but no model in it
    not_a_model = "is neither a checkpoint directory (a run, or one of its checkpoints/step-N) nor a torch .pth of " \
                  "an RWKV-LM x070 model: "
    for src, says in [(tmp_path / "not-a-run", "no checkpoint found"),
                      (tmp_path / "garbage.pth", not_a_model + "torch.load cannot read it"),
                      (tmp_path / "notes.txt", not_a_model + "torch.load cannot read it"),
                      (tmp_path / "other.pth", not_a_model + "not an RWKV-7 x070 state dict")]:
        res = musictrain_here("fit", small_shards, "-o", tmp_path / "init", *TINY, "--init-from", src)
        assert res.exit_code == 2 and says in res.output and res.exception.__class__ is SystemExit, res.output
        [line] = [x for x in res.output.splitlines() if x.startswith("Error:")]
        assert "KeyError" not in line and "Traceback" not in res.output, res.output
        assert not (tmp_path / "init").exists()
    # a learning rate AdamW cannot even take (1e300 overflowed float32 inside its step) is refused up front
    for option, value in (("--lr", "1e300"), ("--lr", "1.5"), ("--lr-final", "2")):
        res = musictrain_here("fit", small_shards, "-o", tmp_path / "lr", *TINY, option, value)
        [line] = [x for x in res.output.splitlines() if x.startswith("Error:")]
        assert res.exit_code == 2 and f"{option[2:].replace('-', '_')} must be in " in line, res.output
        assert "1.0]" in line and "only diverges" in line and not (tmp_path / "lr").exists()
    # a runtime failure: weights blown up by a huge weight decay make the loss NaN -> 1
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "nan", *TINY, "--batch-size", "4", "--max-steps",
                          "30", "--weight-decay", "1e30", "--warmup-steps", "0", "--eval-batches", "1")
    assert res.exit_code == 1 and "loss is" in res.output, res.output


def test_a_new_run_over_one_that_failed_before_its_first_checkpoint_keeps_its_logs_apart(small_shards: Path,
                                                                                         tmp_path: Path):
    """The failed run's metrics would otherwise be continued by the new run (two runs in one metrics.jsonl)."""
    run = tmp_path / "run"
    args = (*TINY, "--batch-size", "4", "--eval-batches", "1", "--log-every", "1", "--no-tensorboard")
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "5", "--weight-decay", "1e30",
                          "--warmup-steps", "0")
    assert res.exit_code == 1 and "no checkpoint was written" in res.output, res.output
    failed = (run / "metrics.jsonl").read_text()
    failed_cfg = json.loads((run / "config.json").read_text())
    assert [r["step"] for r in metrics(run)] == [1] and failed_cfg["train"]["weight_decay"] == 1e30

    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "2")  # no --resume needed
    assert res.exit_code == 0, res.output
    earlier = run / "earlier-run-1"
    assert f"moved them to {earlier}" in res.output
    assert [r["step"] for r in metrics(run)] == [1, 2]  # this run's records only (appended: 1, 1, 2)
    assert (earlier / "metrics.jsonl").read_text() == failed  # the failed run's record, byte for byte
    assert json.loads((earlier / "config.json").read_text()) == failed_cfg
    assert json.loads((run / "config.json").read_text())["train"]["weight_decay"] == 0.1
    assert latest_checkpoint(run) is not None

    # a failed run that logged nothing leaves nothing worth keeping: no earlier-run directory
    quiet = tmp_path / "quiet"
    res = musictrain_here("fit", small_shards, "-o", quiet, *TINY, "--batch-size", "4", "--max-steps", "5",
                          "--weight-decay", "1e30", "--warmup-steps", "0", "--no-tensorboard")
    assert res.exit_code == 1 and (quiet / "metrics.jsonl").read_text() == ""
    assert musictrain_here("fit", small_shards, "-o", quiet, *args, "--max-steps", "1").exit_code == 0
    assert [r["step"] for r in metrics(quiet)] == [1] and not list(quiet.glob("earlier-run-*"))

    # a name taken by a dangling link is not free: the next one is used, no traceback
    dangling = tmp_path / "dangling"
    res = musictrain_here("fit", small_shards, "-o", dangling, *args, "--max-steps", "5", "--weight-decay", "1e30",
                          "--warmup-steps", "0")
    assert res.exit_code == 1
    (dangling / "earlier-run-1").symlink_to(tmp_path / "nowhere")
    res = musictrain_here("fit", small_shards, "-o", dangling, *args, "--max-steps", "1")
    assert res.exit_code == 0 and f"moved them to {dangling / 'earlier-run-2'}" in res.output, res.output


@pytest.fixture(scope="module")
def other_build(corpus_dir: Path, build_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus built with another seed: other windows in other shards (a different build)."""
    out = tmp_path_factory.mktemp("other-shards") / "out"
    args = list(SMALL_BUILD_ARGS)
    args[args.index("--seed") + 1] = "1"
    build_cli(corpus_dir, out, *args)
    return out


def test_resume_on_another_build_is_refused_unless_accepted(small_shards: Path, other_build: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = (*TINY, "--batch-size", "4", "--eval-batches", "1", "--log-every", "1")
    assert musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "2").exit_code == 0
    first = json.loads((run / "config.json").read_text())["build_id"]
    assert read_trainer_state(latest_checkpoint(run)).build_id == first

    res = musictrain_here("fit", other_build, "-o", run, *args, "--max-steps", "3", "--resume")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "another shard build" in errors[0] and "--accept-new-data" in errors[0]
    assert read_trainer_state(latest_checkpoint(run)).step == 2  # nothing trained, nothing written

    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "3", "--resume")  # the same build
    assert res.exit_code == 0, res.output
    res = musictrain_here("fit", other_build, "-o", run, *args, "--max-steps", "4", "--resume", "--accept-new-data")
    assert res.exit_code == 0 and "--accept-new-data: continuing on build" in res.output, res.output
    new = json.loads((run / "config.json").read_text())["build_id"]
    assert new != first and read_trainer_state(latest_checkpoint(run)).build_id == new
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_run_files_get_the_umask_modes(small_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rwkv_music.train.cli", "fit", str(small_shards), "-o", str(run), *TINY,
           "--batch-size", "4", "--max-steps", "2", "--save-every", "1", "--eval-batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fit_env(),
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "trainer_state.json", "optimizer.pt", "metrics.jsonl",
            "loss.png", "latest.json", "tokenizer.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    dirs = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [run, *run.rglob("*")]
            if p.is_dir()}
    assert set(dirs.values()) == {"0o755"}, dirs
    assert load(latest_checkpoint(run)).cfg.n_layer == 2


def test_version_and_every_fit_option_has_help_with_the_configs_default():
    res = musictrain_here("--version")
    assert res.exit_code == 0 and res.output.strip() == f"musictrain {version('rwkv-music')}"
    res = musictrain_here("fit", "--help")
    assert res.exit_code == 0
    import click

    from rwkv_music.train.cli import main

    fit_cmd = main.get_command(click.Context(main), "fit")
    ctx = click.Context(fit_cmd)
    defaults = TrainConfig()
    for param in fit_cmd.params:
        if not isinstance(param, click.Option):
            continue
        names, text = param.get_help_record(ctx)
        assert text.strip(), names
        assert "".join(text.split()) in "".join(res.output.split())  # and --help shows it (however wrapped)
        field = param.name
        if field in defaults.__dataclass_fields__:
            value = getattr(defaults, field)
            if value not in (None, ""):  # out is required; a None default says what it means
                shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
                assert text.endswith(f"[default: {shown}]"), (names, text)


def test_val_loss_is_shown_while_training(small_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = ("--preset", "tiny", "--n-layer", "2", "--n-embd", "64", "--device", "cpu", "--batch-size", "4",
            "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1")
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--progress")
    assert res.exit_code == 0, res.output
    vals = {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}
    assert sorted(vals) == [2, 4]
    for step, v in vals.items():  # the line after each evaluation
        assert f"[musictrain] step {step}/4: loss " in res.output and f"val loss {v:.4f}" in res.output
    assert f"val={vals[4]:.4f}" in res.output  # the progress bar's postfix
