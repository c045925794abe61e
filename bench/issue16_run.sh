#!/usr/bin/env bash
# The real-corpus run of docs/results.md: train within a time budget (SIGTERM at the end of it: the trainer
# finishes its step and writes a checkpoint), then `musictrain eval` on the test half of the val pieces with
# complete's default sampling. The defaults are docs/results.md's run (2026-12-03: 448 s of fit, 35 s of eval
# on an H200); its 2026-12-07 run added FIT_ARGS="--repeat-contrast 1" (add --mix-shards 1 for that run's data
# order: fit mixes 16 shards at once since).
#
#   bash bench/issue16_run.sh SHARDS WORK RESULTS
#   env: STAGES ("fit eval"; one of them alone runs that stage on WORK/run), TRAIN_S, PRESET, MAX_STEPS,
#        BATCH_TOKENS, LR, EVAL_EVERY, SAVE_EVERY, FIT_ARGS (more fit options, e.g. "--repeat-contrast 1"; the 2026-12-03
#        run trained with bf16 autocast, fit's CUDA default then: FIT_ARGS="--precision bf16 --recompute none" repeats
#        it), EVAL_WINDOWS, EVAL_S, PY
set -uo pipefail
shards="${1:?usage: bench/issue16_run.sh SHARDS WORK RESULTS}"
work="${2:?}"
results="${3:?}"
PY="${PY:-python3}"
stages="${STAGES:-fit eval}"
mkdir -p "$results" "$work"
if [[ " $stages " == *" fit "* ]]; then
    rm -rf "$work/run"
    fit=(fit "$shards" -o "$work/run" --preset "${PRESET:-base}" --batch-tokens "${BATCH_TOKENS:-32768}"
         --max-steps "${MAX_STEPS:-2600}" --lr "${LR:-6e-4}" --eval-every "${EVAL_EVERY:-200}" --eval-batches 100
         --save-every "${SAVE_EVERY:-400}" --log-every 25 --no-progress --no-tensorboard)
    # shellcheck disable=SC2206
    fit+=(${FIT_ARGS:-})
    echo "musictrain ${fit[*]}" > "$results/fit.log"
    timeout -s TERM -k 30 "${TRAIN_S:-470}" "$PY" -m rwkv_music.train.cli "${fit[@]}" >> "$results/fit.log" 2>&1
    echo "fit rc=$?"
    cp "$work/run/metrics.jsonl" "$results/metrics.jsonl" 2>/dev/null
    tail -n 4 "$results/fit.log"
fi
if [[ " $stages " == *" eval "* ]]; then
    rm -rf "$work/report"
    ev=(eval "$work/run" "$shards" --split val --pieces test --num-windows "${EVAL_WINDOWS:-64}" --choice-windows 1000
        --piano-rolls 4 -o "$work/report" -q)
    echo "musictrain ${ev[*]}" > "$results/eval.log"
    timeout -k 10 "${EVAL_S:-150}" "$PY" -m rwkv_music.train.cli "${ev[@]}" >> "$results/eval.log" 2>&1
    echo "eval rc=$?"
    for by in "" "--phase 8"; do  # the forced choice by collection, then by place in an eight-bar phrase
        # shellcheck disable=SC2086
        "$PY" bench/choice_by_source.py "$work/report/report.json" --min-windows 0 $by >> "$results/eval.log" 2>&1
    done
    tail -n 50 "$results/eval.log"
fi
tar czf "$results/issue16.tgz" -C "$work" run/metrics.jsonl run/config.json run/loss.png report 2>/dev/null
exit 0
