"""`musictrain complete` and its Python API on a tiny model trained here on real windows of real MIDI files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import symusic
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from rwkv_music.model import RWKV7, RWKV7Config
from rwkv_music.model import save as save_model
from rwkv_music.remi.grammar import PITCH, BatchedGrammar, RemiGrammar
from rwkv_music.remi.tokenizer import (
    build_tokenizer,
    encode_piano,
    load_piano_score,
    save_tokenizer,
    tokenizer_hash,
)
from rwkv_music.remi.windows import Vocab, WindowSpec, build_prompt, decode_window, make_windows
from rwkv_music.train import metrics as M
from rwkv_music.train.checkpoints import load_for_inference
from rwkv_music.train.complete import (
    CompleteConfig,
    CompletionError,
    candidate_seeds,
    complete,
    generate,
    generate_candidates,
    prefill,
)
from rwkv_music.train.complete_output import format_table, write_completion
from rwkv_music.train.consensus import consensus_index
from rwkv_music.train.sampling import SamplingConfig

TRAIN_FILES = ["MIDIs_one_track/POP909_008.mid", "MIDIs_one_track/POP909_010.mid", "MIDIs_one_track/Maestro_1.mid"]
PROMPT = "MIDIs_one_track/POP909_022.mid"
STEPS = 20


def _train_tiny(tok, corpus: Path) -> RWKV7:
    """A 2-layer model trained a few steps on real windows (next-token loss), so it is not just noise."""
    vocab = Vocab(tok)
    windows = []
    for f in TRAIN_FILES:
        ids = encode_piano(load_piano_score(corpus / f, tok), tok)
        windows += [w.tokens for w in make_windows(ids, vocab, WindowSpec(max_seq_len=192))]
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=len(tok.vocab), n_layer=2, n_embd=64, head_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pad = tok.vocab["PAD_None"]
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        pick = torch.randint(len(windows), (8,), generator=g).tolist()
        T = max(len(windows[i]) for i in pick)
        x = torch.full((8, T), pad, dtype=torch.long)
        for r, i in enumerate(pick):
            x[r, : len(windows[i])] = torch.tensor(windows[i])
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), ignore_index=pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _write_run(run: Path, model: RWKV7, tok) -> Path:
    """The trainer's run-directory layout: RUN/checkpoints/step-N/{model, tokenizer.json}, latest.json."""
    name = f"step-{STEPS:08d}"
    ckpt = run / "checkpoints" / name
    save_model(model, ckpt, extra_meta={"step": STEPS, "val_loss": None, "tokenizer_hash": tokenizer_hash(tok)})
    save_tokenizer(tok, ckpt / "tokenizer.json")
    save_tokenizer(tok, run / "tokenizer.json")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": STEPS, "path": name, "val_loss": None}))
    return run


@pytest.fixture(scope="module")
def run_dir(corpus_dir: Path, tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # identical float math in every test, whatever the machine
    tok = build_tokenizer()
    return _write_run(tmp_path_factory.mktemp("complete") / "run", _train_tiny(tok, corpus_dir), tok)


@pytest.fixture(scope="module")
def loaded(run_dir: Path):
    model, tok, _ = load_for_inference(run_dir, "cpu")
    return model, tok


@pytest.fixture(scope="module")
def prompt(corpus_dir: Path) -> Path:
    return corpus_dir / PROMPT


def _bar_ticks(score: symusic.Score) -> int:
    ts = score.time_signatures[0]
    return score.tpq * 4 * ts.numerator // ts.denominator


def test_prefill_then_steps_equals_parallel_forward(loaded, prompt: Path):
    model, tok = loaded
    ids = encode_piano(load_piano_score(prompt, tok), tok)
    w = build_prompt(ids[:600], Vocab(tok), 4, 2048)
    tokens = w.tokens + ids[600:640]  # the prompt window, then the piece's real next tokens
    P = len(w.tokens)
    with torch.no_grad():
        full = model(torch.tensor([tokens]))[0]
        logits, state = prefill(model, w.tokens, model.device)
        torch.testing.assert_close(logits[0], full[P - 1], atol=1e-4, rtol=1e-4)
        for t in range(P, len(tokens)):
            logits, state = model.step(torch.tensor([tokens[t]]), state)
            torch.testing.assert_close(logits[0], full[t], atol=1e-4, rtol=1e-4)


def test_batch_of_four_equals_four_single_runs(loaded, prompt: Path):
    model, tok = loaded
    cfg = CompleteConfig(bars=2, num_samples=4, seed=7, sampling=SamplingConfig(temperature=1.0, top_p=0.95))
    batch = complete(model, tok, prompt, cfg)
    assert [s.seed for s in batch.samples] == [7, 8, 9, 10]
    singles = [complete(model, tok, prompt, CompleteConfig(bars=2, num_samples=1, seed=7 + k,
                                                           sampling=cfg.sampling)).samples[0] for k in range(4)]
    assert [s.tokens for s in batch.samples] == [s.tokens for s in singles]
    assert len({tuple(s.tokens) for s in batch.samples}) > 1  # the seeds do make different variations


def test_samples_past_max_batch_are_decoded_in_batches_to_the_same_samples(loaded, prompt: Path):
    """Memory is bounded by max_batch, not by num_samples; splitting the samples changes none of them."""
    model, tok = loaded
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    whole = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=5, seed=3, sampling=sampling))
    heard: list[list[int]] = []
    split = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=5, seed=3, sampling=sampling,
                                                        max_batch=2),
                     progress=lambda tokens, bars: heard.append(bars))
    assert [s.tokens for s in split.samples] == [s.tokens for s in whole.samples]
    assert [s.seed for s in split.samples] == [3, 4, 5, 6, 7]
    # the progress callback always sees every sample: batches done count fully, batches to come not yet
    assert {len(b) for b in heard} == {5} and heard[-1] == [1] * 5
    assert all(sum(a) <= sum(b) for a, b in itertools.pairwise(heard))
    assert any(b[:2] == [1, 1] and b[4] == 0 for b in heard)  # the second batch, with the first done
    with pytest.raises(ValueError, match="max_batch"):
        CompleteConfig(max_batch=0)
    with pytest.raises(ValueError, match=r"num_samples must be in 1 \.\. 10000"):
        CompleteConfig(num_samples=10001)


def _logprob(model, grammar: RemiGrammar, window, start, cont: list[int], bars: int,
             budget: int) -> tuple[float, int]:
    """Summed log-probability, and number, of the tokens of `cont` and of the Bar that closes it, over the steps
    where the grammar allowed more than one token, from one parallel forward (temperature 1, the grammar's tokens
    only)."""
    toks = [*cont, grammar.bar_id]
    bg = BatchedGrammar(grammar, start, 1, bars, budget)
    with torch.no_grad():
        logits = model(torch.tensor([window.tokens + toks]))[0, len(window.tokens) - 1:].float()
    total, n = 0.0, 0
    for t, tok in enumerate(toks):
        allowed = bg.allowed()[0]
        if int(allowed.sum()) > 1:
            total += torch.log_softmax(logits[t, :grammar.vocab_size].masked_fill(~allowed, -math.inf), -1)[tok].item()
            n += 1
        bg.update(torch.tensor([tok]))
    return total, n


def test_candidates_keep_the_continuation_the_model_finds_likeliest(loaded, prompt: Path):
    """With candidates C, every candidate row is reproducible alone from its seed, its score is the model's mean
    log-probability over the steps that had a choice (checked against an independent parallel forward, at a
    sampling temperature other than 1), and sample k is its best-scoring candidate."""
    model, tok = loaded
    grammar = RemiGrammar(tok)
    window = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=1)).window  # the prompt's last bars
    start = grammar.run(window.tokens, window.meta_len, strict=False)
    n, C, bars, budget = 4, 4, 2, 96
    assert candidate_seeds(5, 2, 2) == [5, 6, 5 + 2**20, 6 + 2**20]
    sampling = SamplingConfig(temperature=1.3, top_p=1.0, candidates=C, choose="likeliest")
    kw = dict(bars=bars, max_new_tokens=budget)
    rows, scores = generate_candidates(model, grammar, window.tokens, start, num_samples=n, sampling=sampling, seed=5,
                                       **kw)
    plain = dataclasses.replace(sampling, candidates=1)
    alone = [generate(model, grammar, window.tokens, start, num_samples=1, sampling=plain, seed=s, **kw)[0]
             for s in candidate_seeds(5, n, C)]
    assert rows == alone
    assert rows[:n] == generate(model, grammar, window.tokens, start, num_samples=n, sampling=plain, seed=5, **kw)
    assert len({tuple(r) for r in rows}) > n  # candidates differ
    logprobs = [_logprob(model, grammar, window, start, r, bars, budget) for r in rows]
    assert scores == pytest.approx([total / m for total, m in logprobs], rel=1e-4, abs=1e-5)
    best = [max(range(C), key=lambda c, k=k: scores[c * n + k]) for k in range(n)]
    print(f"scores {[round(x, 3) for x in scores]}, best candidate per sample {best}")
    assert any(c > 0 for c in best)
    # a mean, not a sum: here at least one sample's best by mean is not its best by summed log-probability
    assert any(max(range(C), key=lambda c, k=k: logprobs[c * n + k][0]) != best[k] for k in range(n))
    chosen = generate(model, grammar, window.tokens, start, num_samples=n, sampling=sampling, seed=5, **kw)
    assert chosen == [rows[c * n + k] for k, c in enumerate(best)]
    # complete() splits rows, not samples, by max_batch: the same samples either way
    cfg = CompleteConfig(bars=1, num_samples=3, seed=5, sampling=sampling)
    whole = complete(model, tok, prompt, cfg)
    split = complete(model, tok, prompt, dataclasses.replace(cfg, max_batch=4))
    assert [s.tokens for s in split.samples] == [s.tokens for s in whole.samples]
    # each sample records the candidate it kept, and the table shows it
    w_start = grammar.run(whole.window.tokens, whole.window.meta_len, strict=False)
    _, w_scores = generate_candidates(model, grammar, whole.window.tokens, w_start, bars=1, num_samples=3,
                                      max_new_tokens=cfg.budget, sampling=sampling, seed=5)
    assert [s.candidate for s in whole.samples] == [max(range(C), key=lambda c, k=k: w_scores[c * 3 + k])
                                                     for k in range(3)]
    table = [line.split() for line in format_table(whole).splitlines()]
    assert table[0][:3] == ["sample", "seed", "kept"]
    assert [int(r[2]) for r in table[1:]] == [s.candidate for s in whole.samples]
    with pytest.raises(ValueError, match="candidates"):
        SamplingConfig(candidates=0)
    # greedy decoding has one continuation per prompt: it is drawn once, not C times, and the setting is kept as asked
    greedy = SamplingConfig(candidates=8, temperature=0.0)
    assert (greedy.drawn, greedy.candidates) == (1, 8)
    assert SamplingConfig(top_k=1).drawn == SamplingConfig(min_p=1.0).drawn == 1
    assert dataclasses.replace(greedy, temperature=0.85).drawn == 8


def test_consensus_keeps_the_candidate_whose_metrics_are_central(loaded, prompt: Path):
    """choose="consensus": sample k is the candidate whose music metrics (its notes decoded alone, over the bars
    asked for) are nearest to its other candidates', among the same rows `generate_candidates` draws."""
    model, tok = loaded
    grammar, vocab = RemiGrammar(tok), Vocab(tok)
    window = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=1)).window
    start = grammar.run(window.tokens, window.meta_len, strict=False)
    n, C, bars = 3, 6, 2
    sampling = SamplingConfig(temperature=1.3, top_p=1.0, candidates=C, choose="consensus")
    kw = dict(bars=bars, max_new_tokens=96, num_samples=n, sampling=sampling, seed=11)
    rows, none = generate_candidates(model, grammar, window.tokens, start, **kw)
    assert none is None  # nothing scored where the likeliest is not asked for
    kw_likely = {**kw, "sampling": dataclasses.replace(sampling, choose="likeliest")}
    same_rows, scores = generate_candidates(model, grammar, window.tokens, start, **kw_likely)
    assert same_rows == rows
    meta = [start.meter, start.tempo if start.tempo >= 0 else vocab.default_tempo]
    feats = []
    for row in rows:  # each candidate decoded on its own, as `complete` writes it
        notes = M.notes_from_score(decode_window(meta + row, 2, tok, vocab), n_bars=bars)
        assert notes.n_bars == bars
        feats.append(np.array([M.compute_metrics(notes)[m] for m in M.METRIC_NAMES]))
    central = [consensus_index(feats[k::n]) for k in range(n)]
    likeliest = [max(range(C), key=lambda c, k=k: scores[c * n + k]) for k in range(n)]
    print(f"consensus {central}, likeliest {likeliest}")
    assert central != likeliest and any(c > 0 for c in central)
    chosen = generate(model, grammar, window.tokens, start, tokenizer=tok, **kw)
    assert chosen == [rows[c * n + k] for k, c in enumerate(central)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, grammar, window.tokens, start, **kw)
    with pytest.raises(ValueError, match="choose"):
        SamplingConfig(candidates=2, choose="best")


def test_unconstrained_high_temperature_still_decodes(loaded, prompt: Path):
    """Temperature 5 with top-p off: close to uniform over whatever the grammar allows."""
    model, tok = loaded
    g = RemiGrammar(tok)
    bars = 2
    res = complete(model, tok, prompt, CompleteConfig(bars=bars, num_samples=6, seed=1,
                                                      sampling=SamplingConfig(temperature=5.0, top_p=1.0)))
    start = g.run(res.window.tokens, res.window.meta_len)
    for s in res.samples:
        g.run(s.tokens, st=start, strict=True)  # raises GrammarError on any disallowed token
        assert s.bars == bars and s.tokens[0] == g.bar_id
        n_pitch = sum(1 for t in s.tokens if g.cls[t] == PITCH)
        assert s.continuation.note_num() == n_pitch  # no note dropped by the decoder
        limit = bars * _bar_ticks(s.continuation)
        assert all(n.time < limit for n in s.continuation.tracks[0].notes) if n_pitch else True
        cont = s.window_score.tracks[1]
        assert cont.name == "continuation" and cont.note_num() == n_pitch
        assert all(s.window_continuation_tick <= n.time < s.window_continuation_tick + limit for n in cont.notes)
        assert s.score.tracks[1].note_num() == n_pitch
        assert s.score.tracks[0].note_num() == sum(1 for t in res.prompt_ids if g.cls[t] == PITCH)


def test_token_budget_closes_every_sample(loaded, prompt: Path):
    model, tok = loaded
    g = RemiGrammar(tok)
    res = complete(model, tok, prompt, CompleteConfig(bars=3, num_samples=4, seed=3, max_new_tokens=16,
                                                      sampling=SamplingConfig(temperature=5.0, top_p=1.0)))
    start = g.run(res.window.tokens, res.window.meta_len)
    for s in res.samples:
        assert s.bars == 3 and len(s.tokens) <= 15  # the 16th token is the Bar that ends the sample
        g.run(s.tokens, st=start, strict=True)


def test_same_seed_same_files(loaded, prompt: Path, tmp_path: Path):
    model, tok = loaded
    cfg = CompleteConfig(bars=1, num_samples=2, seed=11)
    a = write_completion(complete(model, tok, prompt, cfg), tmp_path / "a")
    b = write_completion(complete(model, tok, prompt, cfg), tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_api_errors(loaded, corpus_dir: Path):
    model, tok = loaded
    with pytest.raises(CompletionError, match="cannot read"):
        complete(model, tok, corpus_dir / "MIDIs_corrupted" / "ValueError_Control168.mid")
    with pytest.raises(CompletionError, match="no notes"):
        complete(model, tok, corpus_dir / "MIDIs_one_track" / "empty.mid")
    with pytest.raises(CompletionError, match="fewer than the 500 context bars"):
        complete(model, tok, corpus_dir / PROMPT, CompleteConfig(context_bars=500))


def test_cli_writes_samples_and_table(run_dir: Path, prompt: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rwkv_music.train.cli", "complete", str(run_dir), str(prompt),
                           "-o", str(out), "--bars", "2", "--context-bars", "all", "--num-samples", "3",
                           "--seed", "5", "--min-p", "0.05", "--device", "cpu", "--no-fast-step",
                           "--plot"], capture_output=True, text=True, timeout=300,
                          umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert "float32 on cpu" in proc.stdout  # --dtype auto: float32 on the CPU
    assert "generating" not in proc.stderr  # no progress bar when stderr is not a terminal
    for f in out.iterdir():  # the umask's mode, as for any file opened for writing (not the staging 0600)
        assert f.stat().st_mode & 0o777 == 0o644, f
    lines = [line.split() for line in proc.stdout.splitlines()]
    head = next(x for x in lines if x[:2] == ["sample", "seed"])
    col = {name: head.index(name) for name in ("kept", "notes", "bars")}  # candidates by default: a "kept" column
    rows = [x for x in lines if x and x[0].isdigit()]
    assert [r[:2] for r in rows] == [["0", "5"], ["1", "6"], ["2", "7"]]
    assert all(r[col["bars"]] == "2" for r in rows)
    assert all(0 <= int(r[col["kept"]]) < SamplingConfig().candidates for r in rows)
    for k in range(3):
        full = symusic.Score(str(out / f"sample-{k}.mid"))
        cont = symusic.Score(str(out / f"sample-{k}-continuation.mid"))
        n_cont = int(rows[k][col["notes"]])
        # (a MIDI file keeps no empty track: a continuation of rests has only the marker)
        assert [t.name for t in full.tracks] == ["prompt", "continuation"][: 2 if n_cont else 1]
        assert full.tracks[0].note_num() > 0 and cont.note_num() == n_cont
        assert full.tracks[-1].note_num() == n_cont or not n_cont
        [marker] = [m for m in full.markers if m.text == "continuation"]
        assert all(n.time < marker.time for n in full.tracks[0].notes)
        assert all(n.time >= marker.time for n in full.tracks[1].notes) if n_cont else True
        notes = cont.tracks[0].notes if cont.tracks else []
        assert all(n.time < 2 * _bar_ticks(cont) for n in notes)
        assert (out / f"sample-{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def _invoke(*args: str):
    from rwkv_music.train.cli import main

    return CliRunner().invoke(main, ["complete", *args, "--device", "cpu"])


@pytest.mark.parametrize("case", ["unreadable", "no-notes", "short", "missing-prompt", "missing-checkpoint",
                                  "checkpoint-is-a-file", "corrupt-checkpoint", "nan-temperature", "nan-top-p",
                                  "out-under-a-file"])
def test_cli_input_errors_are_one_line_exit_2(case: str, run_dir: Path, corpus_dir: Path, tmp_path: Path):
    prompt = {"unreadable": corpus_dir / "MIDIs_corrupted" / "ValueError_Control168.mid",
              "no-notes": corpus_dir / "MIDIs_one_track" / "empty.mid",
              "missing-prompt": tmp_path / "nope.mid"}.get(case, corpus_dir / PROMPT)
    ckpt = {"missing-checkpoint": tmp_path / "no-run",
            "checkpoint-is-a-file": run_dir / "checkpoints" / "latest.json"}.get(case, run_dir)
    extra = {"short": ["--context-bars", "999"], "nan-temperature": ["--temperature", "nan"],
             "nan-top-p": ["--top-p", "nan"]}.get(case, [])
    out = tmp_path / "out"
    if case == "out-under-a-file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    if case == "corrupt-checkpoint":  # a copy of the run whose weights file was cut short
        import shutil

        ckpt = tmp_path / "run"
        shutil.copytree(run_dir, ckpt)
        for w in ckpt.rglob("model.safetensors"):
            w.write_bytes(w.read_bytes()[:100])
    res = _invoke(str(ckpt), str(prompt), "-o", str(out), *extra)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_out_of_range_options_name_themselves(run_dir: Path, corpus_dir: Path, tmp_path: Path):
    for args, option in ((["--context-bars", "0"], "--context-bars"), (["--seed", str(2**64)], "--seed")):
        res = _invoke(str(run_dir), str(corpus_dir / PROMPT), "-o", str(tmp_path / "out"), *args)
        assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, res.output
        assert not (tmp_path / "out").exists()


def test_cli_refuses_more_samples_than_fit_in_memory_before_loading(run_dir: Path, corpus_dir: Path, tmp_path: Path):
    from rwkv_music.train.complete import MAX_SAMPLES

    res = _invoke(str(run_dir), str(corpus_dir / PROMPT), "-o", str(tmp_path / "out"), "--num-samples", "100000")
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"Error: --num-samples 100000: at most {MAX_SAMPLES} per call") and "--seed" in lines[0]
    assert f"--seed {MAX_SAMPLES}" in lines[0]
    # near the top of the seed range the hint names no seed past it
    res = _invoke(str(run_dir), str(corpus_dir / PROMPT), "-o", str(tmp_path / "out"), "--num-samples", "100000",
                  "--seed", str(2**31 - 5))
    assert res.exit_code == 2 and "lower --seed" in res.output and str(2**31 - 5 + MAX_SAMPLES) not in res.output
    assert not (tmp_path / "out").exists()
    from rwkv_music.train.cli import main

    help_text = " ".join(CliRunner().invoke(main, ["complete", "--help"]).output.split())
    assert f"at most {MAX_SAMPLES} per call" in help_text


def test_cli_tokenizer_mismatch(run_dir: Path, corpus_dir: Path, tmp_path: Path):
    """A checkpoint whose tokenizer.json is not the one the model was trained with."""
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    other = build_tokenizer({"num_velocities": 16})
    for p in bad.rglob("tokenizer.json"):
        save_tokenizer(other, p)
    out = tmp_path / "out"
    res = _invoke(str(bad), str(corpus_dir / PROMPT), "-o", str(out))
    assert res.exit_code == 2 and "tokenizer" in res.output, res.output
    assert len([x for x in res.output.splitlines() if x.strip()]) == 1
    assert not out.exists()


def test_table_lists_every_sample(loaded, prompt: Path):
    model, tok = loaded
    plain = SamplingConfig(candidates=1)
    res = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=2, seed=0, sampling=plain))
    lines = format_table(res).splitlines()
    assert len(lines) == 3 and lines[0].split()[:5] == ["sample", "seed", "tokens", "notes", "bars"]
    assert all(s.candidate is None for s in res.samples)  # no candidates drawn, no "kept" column
    res = complete(model, tok, prompt, CompleteConfig(bars=1, num_samples=2, seed=0))  # the default: candidates
    lines = [line.split() for line in format_table(res).splitlines()]
    assert lines[0][:6] == ["sample", "seed", "kept", "tokens", "notes", "bars"]
    assert [int(x[2]) for x in lines[1:]] == [s.candidate for s in res.samples]


def test_cli_refuses_a_non_empty_out_unless_overwrite(run_dir: Path, prompt: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sample-3.mid", "sample-0.png", "sample-1-continuation.mid"):
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    res = _invoke(str(run_dir), str(prompt), "-o", str(out), "--bars", "1", "--num-samples", "1")
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    assert len([x for x in res.output.splitlines() if x.strip()]) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    res = _invoke(str(run_dir), str(prompt), "-o", str(out), "--bars", "1", "--num-samples", "1", "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sample-0-continuation.mid", "sample-0.mid"]
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    res = _invoke(str(run_dir), str(prompt), "-o", str(tmp_path / "file"))
    assert res.exit_code == 2 and "not a directory" in res.output


def test_progress_bar_on_a_terminal_only(run_dir: Path, prompt: Path, tmp_path: Path):
    """With stderr a terminal (a pty) generation shows a bar of bars and tokens; --quiet turns it off."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    def run(*extra: str) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
        proc = subprocess.Popen([sys.executable, "-m", "rwkv_music.train.cli", "complete", str(run_dir), str(prompt),
                                 "-o", str(tmp_path / f"out{len(extra)}"), "--bars", "2", "--num-samples", "2",
                                 "--device", "cpu", *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave)
        os.close(slave)
        chunks = []
        try:
            while True:  # read while it runs, so a full terminal buffer never blocks it
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child has exited and the terminal is drained
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(master)
        assert proc.wait(timeout=300) == 0
        return b"".join(chunks).decode(errors="replace")

    shown = run()
    assert "generating" in shown and "bars per sample" in shown and "tokens" in shown
    assert "generating" not in run("--quiet")


@pytest.mark.parametrize("command", ["complete", "eval"])
def test_every_option_has_a_help_line(command: str):
    from rwkv_music.train.cli import main

    cmd = main.commands[command]
    real = cmd._load() if hasattr(cmd, "_load") else cmd
    options = [p for p in real.params if isinstance(p, click.Option)]
    assert options and all(p.help for p in options), [p.name for p in options if not p.help]


def test_piano_roll_spans_the_window_and_the_new_bars(loaded, prompt: Path):
    """The roll's x axis is in bars: the prompt window's bars then the continuation's, the last drawn to its end."""
    from rwkv_music.train.complete_output import piano_roll_figure

    model, tok = loaded
    g = RemiGrammar(tok)
    res = complete(model, tok, prompt, CompleteConfig(bars=2, context_bars=3, num_samples=1, seed=0))
    n_ctx = sum(1 for t in res.window.tokens if g.cls[t] == g.cls[g.bar_id])
    ax = piano_roll_figure(res.samples[0]).axes[0]
    assert ax.get_xlim() == (0.0, float(n_ctx + 2))
    dashed = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed == [n_ctx]  # the continuation starts on the bar line after the window
