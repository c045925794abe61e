"""The evaluation report: strict JSON, the HTML page and its plots."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from rwkv_music.train import metrics as M
from rwkv_music.train.eval_choice import IMPOSTORS
from rwkv_music.train.eval_generate import SYSTEM_LABELS, SYSTEMS
from rwkv_music.train.pianoroll import draw_roll, layer, save_figure

# Every file run_eval writes (what `eval --overwrite` clears from an earlier run).
REPORT_FILES = ("report.json", "report.html", "loss_per_type.png", "metric_distributions.png", "pianoroll_*.png")


def json_clean(x):
    """NaN/inf -> None so report.json is strict JSON."""
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list | tuple):
        return [json_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def plot_loss_per_type(tf: dict, unigram: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    items = sorted(tf["per_type"].items(), key=lambda kv: -kv[1]["count"])
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(items) + 2), 3.6))
    names = [k for k, _ in items]
    ax.bar(names, [v["loss"] for _, v in items], color="#4477aa")
    for x, (_, v) in enumerate(items):
        ax.text(x, v["loss"], f"n={v['count']}", ha="center", va="bottom", fontsize=7)
    ax.axhline(tf["loss"], color="k", lw=1, label=f"overall {tf['loss']:.3f}")
    if math.isfinite(unigram.get("entropy_train", float("nan"))):
        ax.axhline(unigram["entropy_train"], color="#cc3311", ls="--", lw=1,
                   label=f"unigram entropy {unigram['entropy_train']:.3f}")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("teacher-forced loss on completion tokens, by target type")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save_figure(fig, path)
    plt.close(fig)


def plot_metric_distributions(windows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = ["pch_distance_truth", *[m for m in M.METRIC_NAMES if m != "n_notes"]]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows))
    systems = ["truth", *SYSTEMS]
    for ax, m in zip(axes.ravel(), panels, strict=False):
        data, labels = [], []
        for sname in systems:
            if m == "pch_distance_truth":
                if sname == "truth":
                    continue
                vals = [w["pch_distance"][sname]["truth"] for w in windows if w["pch_distance"].get(sname)]
            else:
                vals = [w["metrics"][sname][m] for w in windows if w["metrics"].get(sname)]
            vals = [v for v in vals if math.isfinite(v)]
            data.append(vals if vals else [float("nan")])
            labels.append(SYSTEM_LABELS[sname])
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=7)
        ax.set_title("pitch-class histogram distance to truth" if m == "pch_distance_truth" else m, fontsize=9)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def piano_roll_figure(rec: dict):
    """Context (grey) followed by the true completion (top) and the model's (bottom), on a bar axis."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    segs = rec["_segments"]
    ctx, truth = segs["context"], segs["truth"]
    bars = np.concatenate([ctx.bars, truth.bars[1:] + ctx.end])  # the window's bars, then the completion's
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    for ax, name, color in ((axes[0], "truth", "#228833"), (axes[1], "model", "#4477aa")):
        layers = [layer(ctx, "#999999", "context")]
        seg = segs.get(name)
        if seg is not None:
            layers.append(layer(seg, color, SYSTEM_LABELS[name], offset=ctx.end))
        draw_roll(ax, layers, bars, marks=[ctx.end])
        if seg is None:
            ax.text((ctx.n_bars + len(bars) - 1) / 2, 0.5, "(no valid output)", transform=ax.get_xaxis_transform(),
                    ha="center", va="center")
        ax.set_ylabel(f"{SYSTEM_LABELS[name]}\npitch")
    axes[1].set_xlabel("bars from the window's first bar (dashed: the completion starts)")
    axes[0].set_title(f"{rec['source']} window {rec['window']}", fontsize=9)
    return fig


def plot_piano_roll(rec: dict, path: Path) -> None:
    save_figure(piano_roll_figure(rec), path)


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{nd}f}"
    return html.escape(str(x))


def render_html(report: dict) -> str:
    tf, uni, gen = report["teacher_forced"], report["unigram"], report.get("generative")
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>rwkv-music eval</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f3f3f3}</style></head><body>",
         "<h1>Evaluation report</h1>",
         f"<p>checkpoint <code>{html.escape(report['checkpoint'])}</code>, shards "
         f"<code>{html.escape(report['shards'])}</code>, split <b>{html.escape(report['split'])}</b>, device "
         f"{html.escape(report['device'])}, pieces <b>{html.escape(report['pieces']['part'])}</b> "
         f"({report['pieces']['pieces']} of {report['pieces']['split_pieces']} pieces, {report['pieces']['windows']} "
         "windows)</p>",
         "<h2>Teacher-forced (completion tokens)</h2><table><tr><th></th><th>tokens</th><th>loss (nats)</th>"
         "<th>perplexity</th><th>top-1</th><th>top-5</th></tr>",
         f"<tr><th>all</th><td>{tf['tokens']}</td><td>{_fmt(tf['loss'])}</td><td>{_fmt(tf['perplexity'], 2)}</td>"
         f"<td>{_fmt(tf['top1'])}</td><td>{_fmt(tf['top5'])}</td></tr>"]
    for name, v in sorted(tf["per_type"].items(), key=lambda kv: -kv[1]["count"]):
        h.append(f"<tr><th>{html.escape(name)}</th><td>{v['count']}</td><td>{_fmt(v['loss'])}</td>"
                 f"<td>{_fmt(v['perplexity'], 2)}</td><td>{_fmt(v['top1'])}</td><td>{_fmt(v['top5'])}</td></tr>")
    h.append("</table>")
    h.append(f"<p>Unigram baseline: entropy of the training completions' token distribution "
             f"<b>{_fmt(uni['entropy_train'])}</b> nats ({uni['train_tokens']} tokens); its cross-entropy on the "
             f"evaluated tokens {_fmt(uni['cross_entropy_eval'])} nats.</p>")
    h.append("<img src='loss_per_type.png'>")
    fc = report.get("forced_choice")
    if fc:
        c = fc["comparisons"]
        h.append(f"<h2>Forced choice ({fc['windows']} windows)</h2><p>Mean log-likelihood per token of the true "
                 "completion against an impostor after the same prefix: the share of windows where the truth is "
                 "more likely (windows whose impostor equals the truth are left out).</p><table><tr><th>impostor"
                 "</th><th>windows</th><th>truth first</th><th>share</th><th>goal</th><th>identical</th>"
                 "<th>mean margin (nats/token)</th></tr>")
        for name in IMPOSTORS:
            v = c[name]
            h.append(f"<tr><th>{SYSTEM_LABELS[name]}</th><td>{v['n']}</td><td>{v['truth_first']}</td>"
                     f"<td>{_fmt(v['share'])}</td><td>{_fmt(v['goal'], 2)}</td><td>{v['identical']}</td>"
                     f"<td>{_fmt(v['mean_margin_nats'])}</td></tr>")
        v = c["all"]
        h.append(f"<tr><th>both</th><td>{v['n']}</td><td>{v['truth_first']}</td><td>{_fmt(v['share'])}</td>"
                 "<td>–</td><td>–</td><td>–</td></tr></table>")
    if gen:
        h.append(f"<h2>Generative ({gen['n_windows']} windows)</h2><p>valid MIDI: {_fmt(gen['valid_midi_rate'])}"
                 f", right number of bars: {_fmt(gen['bars_ok_rate'])}</p>")
        systems = ["truth", "context", *SYSTEMS]
        h.append("<table><tr><th>metric (mean)</th>" + "".join(f"<th>{SYSTEM_LABELS[s]}</th>" for s in systems)
                 + "</tr>")
        for m in M.METRIC_NAMES:
            h.append(f"<tr><th>{m}</th>" + "".join(
                f"<td>{_fmt(gen['systems'][s]['values'][m]['mean'])}</td>" for s in systems) + "</tr>")
        bases = ("repeat", "random")
        h.append("</table><h3>Closeness to the true completion (lower is closer)</h3><p>Per window: the share of "
                 "windows where the model is closer than the baseline (ties count half), and the exact sign test's "
                 "p.</p><table><tr><th>mean</th>" + "".join(f"<th>{SYSTEM_LABELS[s]}</th>" for s in SYSTEMS)
                 + "".join(f"<th>model closer than {b} (p)</th>" for b in bases) + "</tr>")

        def per_window(m: str) -> str:
            return "".join(f"<td>{_fmt(v['model_closer_rate'])} ({_fmt(v['sign_test_p'])})</td>"
                           for v in (gen[f"model_vs_{b}"][m] for b in bases))

        h.append("<tr><th>pitch-class histogram distance</th>" + "".join(
            f"<td>{_fmt(gen['systems'][s]['pch_distance_truth']['mean'])}</td>" for s in SYSTEMS)
            + per_window("pch_distance_truth") + "</tr>")
        for m in M.METRIC_NAMES:
            h.append(f"<tr><th>|{m} − truth|</th>" + "".join(
                f"<td>{_fmt(gen['systems'][s]['abs_error_vs_truth'][m]['mean'])}</td>" for s in SYSTEMS)
                + per_window(m) + "</tr>")
        h.append("</table><img src='metric_distributions.png'><h3>Piano rolls</h3>")
        for p in report.get("plots", {}).get("piano_rolls", []):
            h.append(f"<p><img src='{html.escape(p)}'></p>")
    h.append("<p>Metric definitions: docs/evaluation.md.</p></body></html>")
    return "\n".join(h)
