"""`musictrain eval` on a briefly trained tiny checkpoint over real shards of the test corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_testutil import TINY, fit_env, musictrain

from rwkv_music.remi.windows import Vocab, replay_last_bars
from rwkv_music.shards import iter_samples
from rwkv_music.train import metrics as M
from rwkv_music.train.checkpoints import load_for_inference
from rwkv_music.train.eval_choice import forced_choice
from rwkv_music.train.evaluate import (
    EvalConfig,
    count_bars,
    decode_segments,
    load_split,
    piece_part,
    run_eval,
    teacher_forced,
    token_types,
)
from rwkv_music.train.sampling_config import SamplingConfig

N_WINDOWS = 3
CHOICE = 40  # forced-choice windows
# Short windows (2 context bars + 1 completion bar, at most 96 tokens) so CPU training and eval stay quick.
BUILD_ARGS = ("--format", "parquet", "--max-seq-len", "96", "--context-bars", "2", "--completion-bars", "1",
              "--samples-per-shard", "1024", "--workers", "2", "--val-fraction", "0.2", "--seed", "0")


def eval_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`musictrain eval ...` as a real subprocess (through the group once `eval` is registered on it), under
    umask 022."""
    from rwkv_music.train.cli import main

    entry = ["-m", "rwkv_music.train.cli", "eval"] if "eval" in main.commands else ["-m", "rwkv_music.train.eval_cli"]
    cmd = [sys.executable, *entry, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fit_env(), umask=0o022)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def small_shards(corpus_dir: Path, build_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-shards") / "out"
    build_cli(corpus_dir, out, *BUILD_ARGS)
    return out


@pytest.fixture(scope="module")
def trained_run(small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("eval-run") / "run"
    musictrain("fit", small_shards, "-o", run, *TINY, "--batch-size", "16", "--max-steps", "60", "--lr", "5e-3",
               "--warmup-steps", "10", "--eval-every", "60", "--eval-batches", "2", "--save-every", "60",
               "--keep-last", "1", "--no-tensorboard")
    return run


@pytest.fixture(scope="module")
def report_dir(trained_run: Path, small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval") / "report"
    proc = eval_cli(trained_run, small_shards, "--num-windows", N_WINDOWS, "--max-tf-windows", 48, "--device", "cpu",
                    "--piano-rolls", 2, "--tokens-per-bar", 48, "--temperature", 0.9, "--min-p", 0.02,
                    "--candidates", 3, "--choose", "consensus", "--choice-windows", CHOICE, "--no-fast-step", "-o", out)
    return out, proc.stdout


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir[0] / "report.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_report_files(report_dir, report):
    out, stdout = report_dir
    for name in ("report.json", "report.html", "loss_per_type.png", "metric_distributions.png",
                 *report["plots"]["piano_rolls"]):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(report["plots"]["piano_rolls"]) == 2
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    for name in ("loss_per_type.png", "metric_distributions.png", "pianoroll_00.png", "Unigram baseline"):
        assert name in html
    assert str(out / "report.html") in stdout and "unigram entropy" in stdout
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    for f in out.iterdir():  # written under umask 022: readable by everyone, like any open()
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_report_records_the_options(report):
    cfg = report["config"]
    assert cfg["fast_step"] is False and cfg["min_p"] == 0.02 and cfg["num_windows"] == N_WINDOWS
    assert cfg["candidates"] == 3 and cfg["choose"] == "consensus"
    assert cfg["device"] == "cpu"


def test_teacher_forced_numbers(report):
    tf = report["teacher_forced"]
    assert tf["windows"] == 48 and tf["tokens"] > 0
    for k in ("loss", "perplexity", "top1", "top5"):
        assert _finite(tf[k]), k
    assert 0 <= tf["top1"] <= tf["top5"] <= 1
    assert tf["perplexity"] == pytest.approx(math.exp(tf["loss"]))
    types = tf["per_type"]
    assert {"Bar", "Position", "Pitch", "Velocity", "Duration"} <= set(types)
    # Per-type losses are means over disjoint sets of targets: weighted by counts they give the overall loss.
    assert sum(v["count"] for v in types.values()) == tf["tokens"]
    assert sum(v["count"] * v["loss"] for v in types.values()) / tf["tokens"] == pytest.approx(tf["loss"], rel=1e-9)
    assert sum(v["count"] * v["top1"] for v in types.values()) / tf["tokens"] == pytest.approx(tf["top1"])
    for v in types.values():
        assert all(_finite(v[k]) for k in ("loss", "perplexity", "top1", "top5"))
    # Every Velocity follows a Pitch and every Duration a Velocity, one each.
    assert types["Pitch"]["count"] == types["Velocity"]["count"] == types["Duration"]["count"]
    # 60 steps already beat a uniform guess over the vocabulary.
    assert tf["loss"] < math.log(470)


def test_unigram_baseline_matches_an_independent_count(report, small_shards: Path):
    counts: dict[int, int] = {}
    for s in iter_samples(small_shards, "train"):
        for t in list(s["tokens"])[int(s["ctx_len"]):]:
            counts[int(t)] = counts.get(int(t), 0) + 1
    n = sum(counts.values())
    h = -sum(c / n * math.log(c / n) for c in counts.values())
    uni = report["unigram"]
    assert uni["train_tokens"] == n
    assert uni["entropy_train"] == pytest.approx(h, rel=1e-9)
    assert _finite(uni["cross_entropy_eval"]) and uni["cross_entropy_eval"] > 0
    assert report["loss_below_unigram_nats"] == pytest.approx(h - report["teacher_forced"]["loss"])


def test_generative_part_and_baselines(report):
    g = report["generative"]
    assert g["n_windows"] == len(g["windows"]) == N_WINDOWS
    assert 0 <= g["valid_midi_rate"] <= 1
    assert g["bars_ok_rate"] == 1.0  # the grammar closes every completion after exactly the asked bars
    for name in ("model", "repeat", "random"):
        sysm = g["systems"][name]
        assert sysm["available"] == N_WINDOWS, name
        assert 0 <= sysm["pch_distance_truth"]["mean"] <= 1
        assert sysm["values"]["note_density"]["n"] == N_WINDOWS
        for m in M.METRIC_NAMES:
            assert m in sysm["abs_error_vs_truth"]
    for w in g["windows"]:
        assert w["random_from"]["piece_id"] != w["piece_id"]
        assert w["generated_bars"] == w["completion_bars"]
        for name in ("context", "truth", "model", "repeat", "random"):
            m = w["metrics"][name]
            assert m["n_notes"] >= 0 and 0 <= m["empty_beat_rate"] <= 1
    assert set(g["model_vs_random"]) >= {"pch_distance_truth", "note_density"}
    # per window, against each baseline: the counts are the windows' own errors, the sign test is exact
    for base in ("repeat", "random"):
        for m in M.METRIC_NAMES:
            v = g[f"model_vs_{base}"][m]
            vals = [(w["metrics"]["model"][m], w["metrics"][base][m], w["metrics"]["truth"][m]) for w in g["windows"]]
            err = [(abs(x - t), abs(y - t)) for x, y, t in vals if None not in (x, y, t)]  # NaN is None in JSON
            assert (v["n"], v["model_closer"], v["base_closer"], v["ties"]) == (
                len(err), sum(a < b for a, b in err), sum(a > b for a, b in err), sum(a == b for a, b in err))
            if err:
                assert v["model_closer_rate"] == pytest.approx((v["model_closer"] + v["ties"] / 2) / len(err))
            assert v["sign_test_p"] == M.sign_test(v["model_closer"], v["base_closer"])
    assert M.sign_test(0, 5) == 2 / 32 and M.sign_test(3, 3) == 1.0 and M.sign_test(0, 0) == 1.0
    # Sampling: the temperature, min-p and candidates given on the command line, the rest complete's defaults.
    assert g["sampling"] == {"temperature": 0.9, "top_k": 0, "top_p": SamplingConfig().top_p, "min_p": 0.02,
                             "candidates": 3, "choose": "consensus", "drawn": 3}


def test_teacher_forced_equals_full_forward(trained_run: Path, small_shards: Path):
    """The masked loss equals cross-entropy read off one plain forward over each whole window."""
    model, tok, _ = load_for_inference(trained_run, "cpu")
    samples = load_split(small_shards, "val", "parquet")[:5]
    tf = teacher_forced(model, samples, token_types(tok), torch.device("cpu"), batch_tokens=200)
    losses = []
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s.tokens]))[0]
            t = torch.tensor(s.tokens)
            nll = torch.nn.functional.cross_entropy(logits[:-1], t[1:], reduction="none")
            losses.append(nll[s.ctx_len - 1:].numpy())
    ref = np.concatenate(losses)
    assert tf["tokens"] == ref.size == sum(s.completion_len for s in samples)
    assert tf["loss"] == pytest.approx(float(ref.mean()), rel=1e-4)


def _val_window_with_context(small_shards: Path, trained_run: Path):
    """(the first val window that kept a context bar, its completion's bars, its decoding).
    With 96-token windows, truncation can drop every context bar; the repeat baseline needs at least one."""
    _, tok, _ = load_for_inference(trained_run, "cpu")
    vocab = Vocab(tok)
    s = next(s for s in load_split(small_shards, "val", "parquet") if count_bars(s.tokens[s.meta_len:s.ctx_len], vocab))
    bars = count_bars(s.tokens[s.ctx_len:], vocab)
    return s, bars, decode_segments(s.tokens[: s.ctx_len], s.meta_len, s.tokens[s.ctx_len:], bars, tok,
                                                vocab)


def test_repeat_baseline_is_the_context_tail(small_shards: Path, trained_run: Path):
    _, bars, d = _val_window_with_context(small_shards, trained_run)
    assert d.context.n_bars >= 1
    rep = M.repeat_last_bars(d.context, bars)
    tail = M.bar_slice(d.context, d.context.n_bars - bars, d.context.n_bars)
    assert rep.onset.tolist() == tail.onset.tolist() and rep.pitch.tolist() == tail.pitch.tolist()


def test_eval_api_with_no_generation(trained_run: Path, small_shards: Path, tmp_path: Path):
    model, tok, info = load_for_inference(trained_run, "cpu")
    res = run_eval(model, tok, small_shards, tmp_path / "r", EvalConfig(num_windows=0, max_tf_windows=8, device="cpu"),
                   tokenizer_hash=info["tokenizer_hash"])
    assert "generative" not in res.report and (tmp_path / "r" / "report.html").is_file()
    with pytest.raises(ValueError, match="tokenizer"):
        run_eval(model, tok, small_shards, tmp_path / "x", EvalConfig(num_windows=0, max_tf_windows=8, device="cpu"),
                 tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="split"):
        run_eval(model, tok, small_shards, tmp_path / "y", EvalConfig(split="test", num_windows=0, device="cpu"))


def test_cli_usage_errors(small_shards: Path, trained_run: Path, tmp_path: Path):
    proc = eval_cli(tmp_path, small_shards, "-o", tmp_path / "r", check=False)  # not a checkpoint
    assert proc.returncode == 2 and "checkpoint" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = eval_cli(trained_run, tmp_path, "-o", tmp_path / "r2", check=False)  # not a shard build
    assert proc.returncode == 2 and "shards" in proc.stderr
    assert not (tmp_path / "r2").exists()


def test_forced_choice_report(report_dir, report):
    fc = report["forced_choice"]
    assert fc["windows"] == len(fc["per_window"]) == CHOICE
    for name in ("repeat", "random", "earlier"):
        c = fc["comparisons"][name]
        assert c["n"] + c["identical"] + c["missing"] == CHOICE
        assert c["n"] > 0 and 0 <= c["truth_first"] <= c["n"] and 0 <= c["share"] <= 1
        assert c["share"] == pytest.approx(c["truth_first"] / c["n"])
        # The counts are those of the per-window log-likelihoods.
        wins = [w for w in fc["per_window"] if name in w["loglik"] and not w["identical"][name]]
        assert c["truth_first"] == sum(w["loglik"]["truth"] > w["loglik"][name] for w in wins)
    assert fc["comparisons"]["repeat"]["goal"] == 0.7 and fc["comparisons"]["random"]["goal"] == 0.95
    assert fc["comparisons"]["earlier"]["goal"] is None and np.isfinite(fc["mean_loglik"]["earlier"])
    both = fc["comparisons"]["all"]
    assert both["truth_first"] <= min(fc["comparisons"][n]["truth_first"] for n in ("repeat", "random"))
    for w in fc["per_window"]:
        assert w["random_from"]["piece_id"] != w["piece_id"]
        assert all(v < 0 for v in w["loglik"].values())  # log-likelihoods of real tokens
    assert len({(w["piece_id"], w["window"]) for w in fc["per_window"]}) == CHOICE
    assert "Forced choice" in (report_dir[0] / "report.html").read_text()
    assert "forced choice on 40 windows" in report_dir[1] and "earlier " in report_dir[1]
    assert "closer to the truth than the repeat: " in report_dir[1] and "sign test p < 0.05" in report_dir[1]


def test_sampling_sweep_scores_a_real_report(report, bench_module):
    """bench/sampling_sweep.py's ranking reads eval's 9 closeness metrics and counts wins as the report has them."""
    sweep = bench_module("sampling_sweep")
    c = sweep.closeness(report)
    systems = report["generative"]["systems"]
    assert set(c) == {"model", "repeat", "random"} and all(len(c[s]) == len(M.METRIC_NAMES) == 9 for s in c)
    sc = sweep.score(c)
    for base, key in (("repeat", "wins_vs_repeat"), ("random", "wins_vs_random")):
        err = {s: [systems[s]["abs_error_vs_truth"][m]["mean"] for m in M.METRIC_NAMES] for s in ("model", base)}
        wins = sum(x is not None and y is not None and x < y for x, y in zip(err["model"], err[base], strict=True))
        assert sc[key] == wins
    assert sc["metrics"] == 9 and sc["rel_error_sum"] >= 0


def test_choice_by_source_regroups_the_report(report_dir, report, bench_module, tmp_path: Path):
    """bench/choice_by_source.py (docs/results.md's table by collection) counts every window once, and its
    per-collection shares add up to the report's own count of wins."""
    mod = bench_module("choice_by_source")
    proc = subprocess.run([sys.executable, mod.__file__, str(report_dir[0] / "report.json"),
                           "--min-windows", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {r[0].strip(): r[1:] for r in (line.strip("|").split("|") for line in proc.stdout.splitlines()[2:])}
    fc = report["forced_choice"]
    assert sum(int(r[0]) for r in rows.values()) == CHOICE
    for imp, col in (("repeat", 1), ("random", 2), ("earlier", 3)):
        compared: dict[str, int] = {}
        for w in fc["per_window"]:
            if imp in w["loglik"] and not w["identical"][imp]:
                g = mod.collection(w["source"])
                compared[g] = compared.get(g, 0) + 1
        wins = sum(round(float(rows[g][col]) * n) for g, n in compared.items())  # shares print 2 decimals
        assert wins == fc["comparisons"][imp]["truth_first"], imp
    # --phase 4: the same windows grouped by their first bar in the piece modulo 4
    proc = subprocess.run([sys.executable, mod.__file__, str(report_dir[0] / "report.json"), "--min-windows", "0",
                           "--phase", "4"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {r[0].strip(): int(r[1]) for r in (line.strip("|").split("|") for line in proc.stdout.splitlines()[2:])}
    want: dict[str, int] = {}
    for w in fc["per_window"]:
        want[f"bar {w['first_bar'] % 4}"] = want.get(f"bar {w['first_bar'] % 4}", 0) + 1
    assert rows == want and len(want) > 1
    # --against: the report beside a copy in which the truth loses every window it won against the repeat
    other = json.loads(json.dumps(report))
    flipped = 0
    for w in other["forced_choice"]["per_window"]:
        ll = w["loglik"]
        if "repeat" in ll and not w["identical"]["repeat"] and ll["truth"] > ll["repeat"]:
            ll["truth"], flipped = ll["repeat"] - 1.0, flipped + 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, mod.__file__, str(report_dir[0] / "report.json"), "--against",
                           str(tmp_path / "other.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("against the repeat"))
    assert flipped > 0 and f"this report only {flipped}, in the other only 0, both 0 " in line, line
    assert line.endswith(f"p = {mod.sign_test(flipped, 0):.3g}")
    assert any(x.startswith("against the earlier: ") for x in proc.stdout.splitlines())


def test_forced_choice_scores_are_teacher_forced_and_seeded(trained_run: Path, small_shards: Path):
    """The truth's mean log-likelihood is minus the teacher-forced loss of its window; the same seed gives the
    same impostors and scores, batched or not."""
    model, tok, _ = load_for_inference(trained_run, "cpu")
    vocab = Vocab(tok)
    samples = load_split(small_shards, "val", "parquet")
    chosen = [i for i, s in enumerate(samples) if count_bars(s.tokens[s.meta_len:s.ctx_len], vocab)][:6]
    dev = torch.device("cpu")
    a = forced_choice(model, samples, chosen, samples, vocab, dev, seed=3)
    b = forced_choice(model, samples, chosen, samples, vocab, dev, seed=3, batch_tokens=100)  # one per batch
    assert [w["random_from"] for w in a["per_window"]] == [w["random_from"] for w in b["per_window"]]
    for wa, wb in zip(a["per_window"], b["per_window"], strict=True):
        for name in wa["loglik"]:
            assert wa["loglik"][name] == pytest.approx(wb["loglik"][name], rel=1e-4)
    for i, w in zip(chosen, a["per_window"], strict=True):
        tf = teacher_forced(model, [samples[i]], token_types(tok), dev)
        assert w["loglik"]["truth"] == pytest.approx(-tf["loss"], rel=1e-4)


def test_repeat_impostor_is_the_repeat_baseline_in_tokens(small_shards: Path, trained_run: Path):
    """Decoded, the repeat impostor's tokens are the notes the generative part's repeat baseline makes."""
    _, tok, _ = load_for_inference(trained_run, "cpu")
    vocab = Vocab(tok)
    checked = 0
    for s in load_split(small_shards, "val", "parquet"):
        nb = count_bars(s.tokens[s.ctx_len:], vocab)
        rep = replay_last_bars(s.tokens, s.meta_len, s.ctx_len, vocab)
        if rep is None:
            assert count_bars(s.tokens[s.meta_len:s.ctx_len], vocab) == 0
            continue
        assert count_bars(rep, vocab) == nb
        d = decode_segments(s.tokens[: s.ctx_len], s.meta_len, rep, nb, tok, vocab)
        ref = M.repeat_last_bars(d.context, nb)
        assert d.completion.onset.tolist() == ref.onset.tolist() and d.completion.pitch.tolist() == ref.pitch.tolist()
        checked += 1
        if checked == 20:
            break
    assert checked == 20


def test_pieces_dev_and_test_partition_the_split(trained_run: Path, small_shards: Path, tmp_path: Path):
    model, tok, _ = load_for_inference(trained_run, "cpu")
    samples = load_split(small_shards, "val", "parquet")
    pieces = {s.piece_id for s in samples}
    parts = {p: piece_part(p) for p in pieces}
    assert parts == {p: piece_part(p) for p in sorted(pieces, reverse=True)}  # a function of the piece alone
    reports = {}
    for part in ("dev", "test"):
        if part not in parts.values():
            continue
        cfg = EvalConfig(num_windows=0, max_tf_windows=None, choice_windows=10, pieces=part, device="cpu")
        reports[part] = run_eval(model, tok, small_shards, tmp_path / part, cfg).report
        for w in reports[part]["forced_choice"]["per_window"]:
            assert parts[w["piece_id"]] == part
    assert reports  # at least one non-empty part
    split = next(iter(reports.values()))["pieces"]
    assert split["split_pieces"] == len(pieces) and split["split_windows"] == len(samples)
    assert sum(r["pieces"]["pieces"] for r in reports.values()) == len(pieces)  # disjoint and covering
    assert sum(r["pieces"]["windows"] for r in reports.values()) == len(samples)
    assert sum(r["teacher_forced"]["windows"] for r in reports.values()) == len(samples)
    for part in {"dev", "test"} - set(reports):  # an empty part is a clear error, not a crash
        with pytest.raises(ValueError, match=part):
            run_eval(model, tok, small_shards, tmp_path / part, EvalConfig(num_windows=0, pieces=part, device="cpu"))


def test_cli_refuses_a_non_empty_report_dir(small_shards: Path, trained_run: Path, tmp_path: Path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "pianoroll_07.png").write_bytes(b"old")
    proc = eval_cli(trained_run, small_shards, "-o", out, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if x.strip()]) == 1
    assert [p.name for p in out.iterdir()] == ["pianoroll_07.png"]
    proc = eval_cli(trained_run, small_shards, "-o", tmp_path / "f" / "x", "--num-windows", "-1", check=False)
    assert proc.returncode == 2  # click's own usage errors exit 2 too


def test_overwrite_clears_only_the_reports_files(trained_run: Path, small_shards: Path, tmp_path: Path):
    model, tok, _ = load_for_inference(trained_run, "cpu")
    out = tmp_path / "r"
    out.mkdir()
    (out / "pianoroll_07.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    res = run_eval(model, tok, small_shards, out, EvalConfig(num_windows=0, max_tf_windows=8, choice_windows=4,
                                                             device="cpu"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", *(f.name for f in res.files)])
    assert (out / "notes.txt").read_text() == "mine"


def test_piano_roll_spans_context_and_completion_bars(small_shards: Path, trained_run: Path):
    """The report's roll shares `complete`'s drawing: x in bars, the window's then the completion's."""
    from rwkv_music.train.eval_report import piano_roll_figure

    s, nb, d = _val_window_with_context(small_shards, trained_run)
    rec = {"source": s.source, "window": s.window,
           "_segments": {"context": d.context, "truth": d.completion, "model": None}}
    fig = piano_roll_figure(rec)
    for ax in fig.axes:
        assert ax.get_xlim() == (0.0, float(d.context.n_bars + nb))
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [d.context.n_bars]
    assert [t.get_text() for t in fig.axes[1].texts] == ["(no valid output)"]  # the model row had no output


def test_earlier_impostor_replays_the_bars_before_the_last(small_shards: Path, trained_run: Path):
    """Decoded, the `earlier` impostor (skip = the completion's bars) is the repeat baseline of the context without
    its last bars: the k context bars before the last k, a copy that --repeat-contrast never trains against."""
    _, tok, _ = load_for_inference(trained_run, "cpu")
    vocab = Vocab(tok)
    checked = 0
    for s in load_split(small_shards, "val", "parquet"):
        nb = count_bars(s.tokens[s.ctx_len:], vocab)
        n_ctx = count_bars(s.tokens[s.meta_len:s.ctx_len], vocab)
        early = replay_last_bars(s.tokens, s.meta_len, s.ctx_len, vocab, skip=nb)
        if nb == 0 or n_ctx < 2 * nb:
            assert early is None
            continue
        assert count_bars(early, vocab) == nb
        d = decode_segments(s.tokens[: s.ctx_len], s.meta_len, early, nb, tok, vocab)
        ref = M.repeat_last_bars(M.bar_slice(d.context, 0, n_ctx - nb), nb)
        assert d.completion.onset.tolist() == ref.onset.tolist() and d.completion.pitch.tolist() == ref.pitch.tolist()
        checked += 1
        if checked == 20:
            break
    assert checked == 20


def test_loss_by_collection_scores_each_collection_of_the_split(small_shards: Path, trained_run: Path, bench_module):
    """bench/loss_by_collection.py: one column per collection of the val split, each the teacher-forced loss of
    that collection's evenly spaced windows, as eval's own scorer gives it."""
    mod = bench_module("loss_by_collection")
    proc = subprocess.run([sys.executable, mod.__file__, str(small_shards), str(trained_run), "--per-collection",
                           "5"], capture_output=True, text=True, timeout=300, env=fit_env())
    assert proc.returncode == 0, proc.stderr
    header, _, row = proc.stdout.splitlines()
    samples = load_split(small_shards, "val", "parquet")
    names = sorted({mod.collection(s.source) for s in samples})
    assert [c.strip().split(" (")[0] for c in header.strip("|").split("|")[1:]] == names
    model, tok, _ = load_for_inference(trained_run, "cpu")
    first = [s for s in samples if mod.collection(s.source) == names[0]]
    want = teacher_forced(model, first[:: max(1, len(first) // 5)][:5], token_types(tok), torch.device("cpu"))
    assert float(row.strip("|").split("|")[1]) == pytest.approx(want["loss"], abs=6e-4)
