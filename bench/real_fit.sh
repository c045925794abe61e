#!/usr/bin/env bash
# `musictrain fit` throughput on real windows (short, uneven: a music21 build has mean ~137 tokens), the
# number a user sees: unpadded input tokens per second from metrics.jsonl, after the first logged interval
# (which holds the compile). Each case runs a fixed number of steps without evaluation or checkpoints.
#
#   bash bench/real_fit.sh SHARDS WORK RESULTS
set -uo pipefail
shards="${1:?usage: bench/real_fit.sh SHARDS WORK RESULTS}"
work="${2:?}"
results="${3:?}"
PY="${PY:-python3}"
mkdir -p "$results"
rm -rf "$work"
common=(--eval-every 100000 --save-every 100000 --eval-batches 1 --log-every 10 --no-progress --no-tensorboard)
run() {  # name, then fit options
    local name="$1"; shift
    timeout --kill-after=10 ${CASE_LIMIT:-110} "$PY" -m rwkv_music.train.cli fit "$shards" -o "$work/$name" "${common[@]}" "$@" \
        > "$results/realfit-$name.log" 2>&1
    echo "$name rc=$?"
    "$PY" - "$work/$name/metrics.jsonl" "$name" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
steady = rows[1:] or rows
tps = sorted(r["tokens_per_s"] for r in steady)
print(json.dumps({"case": sys.argv[2], "intervals": len(steady), "median_tokens_per_s": tps[len(tps) // 2],
                  "last_loss": rows[-1]["loss"], "steps": rows[-1]["step"]}))
PYEOF
}
# Cases without --precision/--recompute take fit's defaults: since 2026-12-07, on one GPU, the lean step (the same
# options as base-packed-lean); base-packed-autocast is the earlier default.
declare -A cases=(
    [base-packed]="--preset base --batch-tokens 32768 --compile --max-steps 50"
    [base-packed-autocast]="--preset base --batch-tokens 32768 --compile --max-steps 50 --precision bf16 --recompute none"
    [small-packed]="--preset small --batch-tokens 65536 --compile --max-steps 60"
    [small-padded]="--preset small --batch-size 16 --max-steps 150"
    # workers pack ahead in other processes (`python bench/batch_build.py .shards-music21`: 3.6 ms per 32768-position
    # batch in fit's main thread on the 2-vCPU development VM, 2026-12-06, CI running beside it); since 2026-12-07 a
    # step no longer waits for the GPU, so without workers the main thread packs while the GPU runs the step before
    [base-packed-w2]="--preset base --batch-tokens 32768 --compile --max-steps 50 --num-workers 2"
    [base-packed-lean]="--preset base --batch-tokens 32768 --compile --max-steps 50 --num-workers 2 --recompute elementwise --precision bf16-weights"
    # bf16 weights keeping every activation: faster than the default, more memory (docs/benchmarks.md, 2026-12-07)
    [base-packed-keep]="--preset base --batch-tokens 32768 --compile --max-steps 50 --recompute none --precision bf16-weights"
)
for name in ${REALFIT_CASES:-base-packed small-packed small-padded}; do
    # shellcheck disable=SC2086
    run "$name" ${cases[$name]}
done
