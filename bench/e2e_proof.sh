#!/usr/bin/env bash
# The end-to-end proof on a GPU machine, in one go:
#   real MIDI corpus -> shards -> the small RWKV-7 preset trained for a step/time budget -> `musictrain eval`.
#
# Usage: bench/e2e_proof.sh WORK_DIR [RESULTS_DIR]
#   WORK_DIR     everything: corpus copy, shards, run (checkpoints, metrics), eval report, proof.log, commands.sh
#   RESULTS_DIR  optional: the 8 files worth keeping (report.json/html, plots, loss curve, log) copied flat
#
# Environment knobs (defaults in brackets):
#   PRESET [small]  STEPS [1500]  TIME_BUDGET_S [330]  BATCH [16]  LR [1e-3]  WARMUP [100]  EVAL_EVERY [150]
#   EVAL_WINDOWS [64]  MAX_TF_WINDOWS [2000]  DEVICE [cuda]  SEED [0]  SPLIT_SEED [0]  VAL_FRACTION [0.15]
#   EXTRA_CORPUS (a folder of more MIDI files)  PY (python interpreter)
#   FIT_PATH [fast]: fast = fit's defaults on CUDA (CUDA WKV kernel, bf16 weights, compiled); reference = the
#     readable path (PyTorch WKV, fp32, eager), for "which reaches the better val loss in the same time"
#   BATCH_TOKENS (unset): packed batches of this many positions per step (fit --batch-tokens) instead of BATCH
#   EVAL [1]: 0 stops after training (the val losses are in run/metrics.jsonl and the summary)
#   SHARDS (unset): train on this existing shard build instead of building the small corpus (stage 1 is skipped),
#     e.g. the music21 build, where 5 minutes are far from one epoch and the tiny corpus's overfitting (its val
#     loss is lowest near step 550) does not hide a difference in speed
#   EVAL_BATCHES (unset): evaluate on N val batches spread over the split (fit --eval-batches), for a large val split
#   FIT_ARGS (unset): more `musictrain fit` options, e.g. "--mix-shards 1"
# Training stops at STEPS or after TIME_BUDGET_S seconds, whichever comes first; a checkpoint is written every
# EVAL_EVERY steps, and eval reads the best one (lowest val loss), so a stop by the time budget loses at most
# EVAL_EVERY steps. The corpus is tiny (28 distinct pieces): SPLIT_SEED 0 with VAL_FRACTION 0.15 puts five whole
# pieces in val (two Maestro piano performances, three pop songs; 1092 windows, checked on 2026-12-02); the split
# is by piece content, so no val piece is ever trained on.
# Sized for one 10-minute device command: on one H100 the small preset ran about 4 steps/s (batch 16), shards
# took 10 s and the kernel build 5 s, so the defaults end in about 8 minutes. On the device machine:
#   EXTRA_CORPUS=<carried copy of the miditok test MIDIs> bash bench/e2e_proof.sh /tmp/proof "$OUT"
# with .whl carried (made here by `bash bench/device_wheels.sh`: miditok, symusic, dask, bokeh, ... wheels).
set -euo pipefail

work="${1:?usage: bench/e2e_proof.sh WORK_DIR [RESULTS_DIR]}"
results="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

PRESET="${PRESET:-small}"
STEPS="${STEPS:-1500}"
TIME_BUDGET_S="${TIME_BUDGET_S:-330}"
BATCH="${BATCH:-16}"
LR="${LR:-1e-3}"
WARMUP="${WARMUP:-100}"
EVAL_EVERY="${EVAL_EVERY:-150}"
EVAL_WINDOWS="${EVAL_WINDOWS:-64}"
MAX_TF_WINDOWS="${MAX_TF_WINDOWS:-2000}"
DEVICE="${DEVICE:-cuda}"
FIT_PATH="${FIT_PATH:-fast}"
EVAL="${EVAL:-1}"
fit_extra=()
if [[ -n "${BATCH_TOKENS:-}" ]]; then fit_extra+=(--batch-tokens "$BATCH_TOKENS"); fi
if [[ -n "${EVAL_BATCHES:-}" ]]; then fit_extra+=(--eval-batches "$EVAL_BATCHES"); fi
# shellcheck disable=SC2206
fit_extra+=(${FIT_ARGS:-})
case "$FIT_PATH" in
    fast) ;;
    reference) export RWKV_MUSIC_WKV=torch; fit_extra+=(--precision fp32 --no-compile) ;;
    *) echo "FIT_PATH must be fast or reference, not $FIT_PATH" >&2; exit 2 ;;
esac
SEED="${SEED:-0}"
SPLIT_SEED="${SPLIT_SEED:-0}"
VAL_FRACTION="${VAL_FRACTION:-0.15}"
if [[ -z "${PY:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PY="$root/.venv/bin/python"; else PY="python3"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

log="$work/proof.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
# Every command that makes a result is also written to commands.sh, so the run can be repeated by hand.
cmds="$work/commands.sh"
printf '#!/usr/bin/env bash\n# Commands of the proof run of %s (cwd: %s)\nset -euo pipefail\nexport PYTHONPATH=%q\n' \
    "$(date -u +%FT%TZ)" "$root" "$PYTHONPATH" >"$cmds"
[[ "$FIT_PATH" == reference ]] && printf 'export RWKV_MUSIC_WKV=torch\n' >>"$cmds"
run() {
    printf '%q ' "$@" >>"$cmds"
    printf '\n' >>"$cmds"
    say "+ $*"
    "$@" 2>&1 | tee -a "$log"
}

# Dependencies: the GPU image has torch but not miditok/symusic/dask/webdataset; they travel as wheels in .whl/.
if ! "$PY" -c "import miditok, symusic, dask.distributed, webdataset, pyarrow, matplotlib" 2>/dev/null; then
    if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
        say "missing Python packages (miditok, symusic, dask, webdataset, ...) and no wheels in $root/.whl"
        exit 1
    fi
    site="$work/site"  # per run: two runs at once must not install into one folder
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$root"/.whl/*.whl
    export PYTHONPATH="$root:$site"
    printf 'export PYTHONPATH=%q\n' "$PYTHONPATH" >>"$cmds"
fi

say "== machine"
{
    date -u +%FT%TZ
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    git -C "$root" rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee -a "$log"

shards="$work/shards"
if [[ -n "${SHARDS:-}" ]]; then
    shards="$(cd "$SHARDS" && pwd)"
    say "== 1/3 shards: the existing build $shards (SHARDS)"
else
    say "== 1/3 corpus and shards"
    corpus="$work/corpus"
    rm -rf "$corpus"
    mkdir -p "$corpus"
    cp -r "$root/examples/demo-corpus" "$corpus/demo"
    for c in "$root/../shared/corpus/miditok-tests" "$root/shared/corpus/miditok-tests" "$root/tests/data/miditok-tests"; do
        if [[ -d "$c" ]]; then
            cp -r "$c" "$corpus/miditok-tests"
            break
        fi
    done
    [[ -n "${EXTRA_CORPUS:-}" ]] && cp -r "$EXTRA_CORPUS" "$corpus/extra"
    say "corpus: $(find "$corpus" -iname '*.mid*' | wc -l) MIDI files (duplicates are skipped by content)"
    workers="$(nproc 2>/dev/null || echo 2)"
    ((workers > 8)) && workers=8
    run "$PY" -m rwkv_music.pipeline.cli build-shards "$corpus" -o "$shards" --format parquet \
        --val-fraction "$VAL_FRACTION" --seed "$SPLIT_SEED" --workers "$workers" --dashboard-address "" --no-progress \
        --overwrite
fi

if [[ "$DEVICE" == cuda ]]; then
    # Build (or load from its cache) the CUDA WKV kernel now, so compiling does not eat the training budget.
    say "== building the CUDA WKV extension"
    "$PY" -c "import time; t = time.time(); from rwkv_music.model import wkv_cuda; ok = wkv_cuda.is_available(); \
print('CUDA WKV available:', ok, wkv_cuda.load_error() or '', f'({time.time() - t:.0f}s)')" 2>&1 | tee -a "$log"
fi

say "== 2/3 train the $PRESET preset on $DEVICE ($FIT_PATH path): at most $STEPS steps or ${TIME_BUDGET_S}s"
rm -rf "$work/run"
t0=$(date +%s)
set +e
run timeout --signal=KILL "$TIME_BUDGET_S" "$PY" -m rwkv_music.train.cli fit "$shards" -o "$work/run" \
    --preset "$PRESET" --device "$DEVICE" --max-steps "$STEPS" --batch-size "$BATCH" --lr "$LR" \
    --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --save-every "$EVAL_EVERY" --keep-last 1 --seed "$SEED" \
    --no-progress ${fit_extra[@]+"${fit_extra[@]}"}
fit_rc=${PIPESTATUS[0]}
set -e
say "fit exit code $fit_rc after $(($(date +%s) - t0))s (137: stopped by the time budget)"
if [[ ! -f "$work/run/checkpoints/latest.json" ]]; then
    say "no checkpoint was written; see $log"
    exit 1
fi

"$PY" - "$work/run/metrics.jsonl" <<'PY' | tee -a "$log"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
vals = [(r["step"], round(r["val_loss"], 4), r["tokens"]) for r in rows if r.get("val_loss") is not None]
print(f"fit: {max((r['step'] for r in rows), default=0)} steps logged; val loss (step, loss, tokens seen): {vals}")
print(f"best val loss {min((v for _, v, _ in vals), default=float('nan'))}")
PY
if [[ "$EVAL" == 0 ]]; then
    say "EVAL=0: no evaluation report"
    exit 0
fi

say "== 3/3 evaluate the best checkpoint on the val split"
run "$PY" -m rwkv_music.train.cli eval "$work/run" "$shards" --split val --num-windows "$EVAL_WINDOWS" \
    --max-tf-windows "$MAX_TF_WINDOWS" --device "$DEVICE" --seed "$SEED" --piano-rolls 4 -o "$work/report"

"$PY" - "$work" <<'PY' | tee -a "$log"
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
r = json.loads((work / "report" / "report.json").read_text())
rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
vals = [(x["step"], x["val_loss"]) for x in rows if x.get("val_loss") is not None]
tf, uni = r["teacher_forced"], r["unigram"]
print("== summary")
print(f"checkpoint {r['checkpoint']}; val losses by step: {vals}")
print(f"teacher-forced val completion loss {tf['loss']:.3f} nats vs unigram entropy {uni['entropy_train']:.3f} "
      f"(unigram cross-entropy on val {uni['cross_entropy_eval']:.3f}); top-1 {tf['top1']:.3f}, top-5 {tf['top5']:.3f}")
for name, v in sorted(tf["per_type"].items(), key=lambda kv: -kv[1]["count"]):
    print(f"  {name:9s} n={v['count']:7d} loss {v['loss']:.3f} top-1 {v['top1']:.3f}")
g = r.get("generative")
if g:
    s = g["systems"]
    print(f"generated {g['n_windows']} completions: valid MIDI {g['valid_midi_rate']:.3f}, "
          f"right bar count {g['bars_ok_rate']:.3f}")
    print("mean |metric - truth| (lower is closer):   model   repeat   random   model closer than random")
    keys = ["pch_distance_truth", "pitch_range", "n_pitch_classes", "note_density", "mean_ioi", "polyphony",
            "empty_beat_rate", "groove_consistency", "scale_consistency"]
    for m in keys:
        def err(sysname):
            x = s[sysname]["pch_distance_truth"] if m == "pch_distance_truth" else s[sysname]["abs_error_vs_truth"][m]
            return float("nan") if x["mean"] is None else x["mean"]
        win = g["model_vs_random"][m]["model_closer_rate"]
        print(f"  {m:20s} {err('model'):8.3f} {err('repeat'):8.3f} {err('random'):8.3f}   "
              f"{float('nan') if win is None else win:.3f}")
print(f"report: {work / 'report' / 'report.html'}")
PY

if [[ -n "$results" ]]; then
    mkdir -p "$results"
    for f in report/report.json report/report.html report/loss_per_type.png report/metric_distributions.png \
        report/pianoroll_00.png report/pianoroll_01.png run/loss.png proof.log; do
        [[ -f "$work/$f" ]] && cp "$work/$f" "$results/"
    done
    say "results copied to $results"
fi
