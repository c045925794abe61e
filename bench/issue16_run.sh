#!/usr/bin/env bash
# The real-corpus run of docs/results.md: train within a time budget (SIGTERM at the end of it: the trainer
# finishes its step and writes a checkpoint), then `musictrain eval` on the test half of the val pieces.
#
#   bash bench/issue16_run.sh SHARDS WORK RESULTS        (env: TRAIN_S, PRESET, MAX_STEPS, BATCH_TOKENS, PY)
set -uo pipefail
shards="${1:?usage: bench/issue16_run.sh SHARDS WORK RESULTS}"
work="${2:?}"
results="${3:?}"
PY="${PY:-python3}"
mkdir -p "$results" "$work"
rm -rf "$work/run" "$work/report"
fit=(fit "$shards" -o "$work/run" --preset "${PRESET:-base}" --batch-tokens "${BATCH_TOKENS:-32768}"
     --max-steps "${MAX_STEPS:-1400}" --eval-every 250 --eval-batches 40 --save-every 500 --log-every 25
     --no-progress --no-tensorboard)
echo "musictrain ${fit[*]}" > "$results/fit.log"
timeout -s TERM -k 30 "${TRAIN_S:-230}" "$PY" -m rwkv_music.train.cli "${fit[@]}" >> "$results/fit.log" 2>&1
echo "fit rc=$?"
ev=(eval "$work/run" "$shards" --split val --pieces test --num-windows "${EVAL_WINDOWS:-64}" --choice-windows 1000
    --piano-rolls 4 -o "$work/report" -q)
echo "musictrain ${ev[*]}" > "$results/eval.log"
timeout -k 10 "${EVAL_S:-150}" "$PY" -m rwkv_music.train.cli "${ev[@]}" >> "$results/eval.log" 2>&1
echo "eval rc=$?"
tar czf "$results/issue16.tgz" -C "$work" run/metrics.jsonl run/config.json run/loss.png report 2>/dev/null
tail -n 30 "$results/eval.log"
