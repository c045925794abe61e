"""`build-shards --bar-phase 8` through training and completion: real MIDI, real shards, real subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import symusic
from click.testing import CliRunner
from fit_testutil import SMALL_BUILD_ARGS, TINY, musictrain

from rwkv_music.pipeline.cli import main as prep_main
from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import META_LEN, Vocab
from rwkv_music.shards import TOKENIZER, iter_samples
from rwkv_music.train.checkpoints import load_for_inference
from rwkv_music.train.complete import CompleteConfig, complete
from rwkv_music.train.sampling import SamplingConfig


def test_phase_tokens_reach_the_shards_the_model_and_the_prompt(corpus_dir: Path, build_cli, tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = sorted((corpus_dir / "MIDIs_one_track").glob("*.mid"))[:6]
    for f in files:
        shutil.copy(f, corpus / f.name)
    shards = tmp_path / "shards"
    build_cli(corpus, shards, *SMALL_BUILD_ARGS, "--bar-phase", "8")

    tok = tokenizer_from_file(shards / TOKENIZER)
    phases = Vocab(tok).phase_ids
    assert len(phases) == 8
    for fmt in ("parquet", "webdataset"):
        rows = [r for split in ("train", "val") for r in iter_samples(shards, split, fmt)]
        assert len(rows) > 100
        for r in rows:
            assert r["meta_len"] == META_LEN + 1 and r["tokens"][META_LEN] == phases[r["first_bar"] % 8]
        assert {int(r["tokens"][META_LEN]) for r in rows} == set(phases)

    run = tmp_path / "run"
    musictrain("fit", shards, "-o", run, *TINY, "--max-steps", "3", "--batch-size", "4", "--eval-every", "3",
               "--eval-batches", "1", "--no-tensorboard")
    model, run_tok, _ = load_for_inference(run, "cpu")
    assert model.cfg.vocab_size >= len(tok.vocab) and Vocab(run_tok).phase_ids == phases

    prompt = files[0]
    one = SamplingConfig(candidates=1)  # the phase token is what is checked here, not the choice among candidates
    done = complete(model, run_tok, str(prompt), CompleteConfig(bars=1, num_samples=1, first_bar=3, seed=1,
                                                                sampling=one))
    n_bars = sum(1 for t in done.prompt_ids if t in Vocab(run_tok).bar_ids)
    assert done.window.tokens[META_LEN] == phases[(n_bars - 4 + 3) % 8]

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rwkv_music.train.cli", "complete", str(run), str(prompt), "-o",
                           str(out), "--bars", "1", "--num-samples", "2", "--first-bar", "3", "--device", "cpu",
                           "--candidates", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for k in range(2):
        assert symusic.Score(str(out / f"sample-{k}.mid")).tracks[0].note_num() > 0

    report = tmp_path / "report"
    musictrain("eval", run, shards, "--num-windows", "2", "--max-tf-windows", "16", "--device", "cpu",
               "--piano-rolls", "0", "--tokens-per-bar", "48", "--choice-windows", "8", "--no-fast-step",
               "--candidates", "1", "-o", report)
    r = json.loads((report / "report.json").read_text())
    assert r["teacher_forced"]["windows"] == 16 and r["forced_choice"]["windows"] == 8
    assert r["generative"]["valid_midi_rate"] == r["generative"]["bars_ok_rate"] == 1.0

    # `musicprep sample`: the completion file holds the full window's last notes, shifted to start at 0
    listen = tmp_path / "listen"
    res = CliRunner().invoke(prep_main, ["sample", str(shards), "-n", "4", "-o", str(listen), "--seed", "2"])
    assert res.exit_code == 0, res.output
    for item in json.loads((listen / "index.json").read_text()):
        full, cont = (sorted((n.time, n.pitch, n.duration) for t in symusic.Score(str(listen / item["files"][p])).tracks
                             for n in t.notes) for p in ("full", "completion"))
        assert cont and [(p, d) for _, p, d in full[-len(cont):]] == [(p, d) for _, p, d in cont]
        shift = full[-len(cont)][0] - cont[0][0]
        assert shift >= 0 and [t - shift for t, _, _ in full[-len(cont):]] == [t for t, _, _ in cont]
