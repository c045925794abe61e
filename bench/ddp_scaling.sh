#!/usr/bin/env bash
# DDP scaling of `musictrain fit`: the same per-GPU batch on 1 GPU, then on NGPU GPUs under torchrun,
# on real shards; prints the trainer's tokens/s (unpadded input tokens, median of the logged steps after
# the first third) for both and the scaling efficiency tokens/s(NGPU) / (NGPU x tokens/s(1)).
#
#   bash bench/ddp_scaling.sh [SHARDS] [NGPU]
#   env: PY (python), DEVICE (cuda; cpu runs gloo for a smoke test), PRESET (base), BATCH (16 per GPU), STEPS (60), OUT (/tmp/ddp-scaling), EXTRA (more fit options)
# Without SHARDS it builds them from ../shared/corpus/miditok-tests (else examples/demo-corpus) into OUT/shards.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python}"
PRESET="${PRESET:-base}"
BATCH="${BATCH:-16}"
STEPS="${STEPS:-60}"
OUT="${OUT:-/tmp/ddp-scaling}"
NGPU="${2:-2}"
shards="${1:-}"
mkdir -p "$OUT"

if [ -z "$shards" ]; then
    corpus="$root/../shared/corpus/miditok-tests"
    [ -d "$corpus" ] || corpus="$root/examples/demo-corpus"
    shards="$OUT/shards"
    if [ ! -f "$shards/manifest.json" ]; then
        "$PY" -m rwkv_music.pipeline.cli build-shards "$corpus" -o "$shards" --format parquet --val-fraction 0.1 \
            --dashboard-address "" --no-progress
    fi
fi

common=(--preset "$PRESET" --batch-size "$BATCH" --max-steps "$STEPS" --log-every 5 --eval-every 1000000
        --save-every 1000000 --eval-batches 1 --warmup-steps 10 --device "${DEVICE:-cuda}" --no-progress --no-tensorboard)
# shellcheck disable=SC2206
extra=(${EXTRA:-})

rm -rf "$OUT/gpu1" "$OUT/gpu$NGPU"
echo "[ddp] 1 GPU" >&2
"$PY" -m rwkv_music.train.cli fit "$shards" -o "$OUT/gpu1" "${common[@]}" "${extra[@]}"
echo "[ddp] $NGPU GPUs" >&2
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m rwkv_music.train.cli fit "$shards" \
    -o "$OUT/gpu$NGPU" "${common[@]}" "${extra[@]}"

"$PY" - "$OUT/gpu1" "$OUT/gpu$NGPU" "$NGPU" "$STEPS" "$PRESET" "$BATCH" <<'PYEOF'
import json, statistics, sys
from pathlib import Path

one, many, n, steps, preset, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]

def tps(run):
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    vals = [r["tokens_per_s"] for r in rows if r["step"] > steps // 3 and "val_loss" not in r]
    return statistics.median(vals), rows[-1]["loss"]

t1, l1 = tps(one)
tn, ln = tps(many)
print(f"preset {preset}, batch {batch} per GPU, {steps} steps")
print("| GPUs | tokens/s | final loss |")
print("|---|---|---|")
print(f"| 1 | {t1:,.0f} | {l1:.4f} |")
print(f"| {n} | {tn:,.0f} | {ln:.4f} |")
print(f"scaling efficiency {tn / (n * t1):.1%} ({tn / t1:.2f}x on {n} GPUs)")
PYEOF
