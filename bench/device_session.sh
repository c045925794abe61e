#!/usr/bin/env bash
# One device-machine command that runs the GPU checks and measurements still owed, each step under its own
# time limit, so that one slow or failing step costs only its own slot; logs and JSON go to RESULTS.
#
#   bash bench/device_session.sh RESULTS [STEP ...]
#
# Steps (default: wheels build gputests trainstep complete; pick others by name, in the order given):
#   wheels      install the carried .whl/ wheels into /tmp/site (see bench/device_wheels.sh); sets PYTHONPATH
#   build       build the CUDA WKV extension once (later steps then start with it compiled)
#   gputests    pytest tests/gpu tests/model/test_model_gpu.py (the float64 checks of the kernel), all but the opt-in
#               Triton WKV's tests (tritontests; with them the step outran its limit, 2026-12-07)
#   trainstep   bench/train_step.py, ours with completion logits, with a profile of 3 steps
#   compile     bench/train_step.py --compile, ours with completion logits (B16 T2048, then B8 T4096)
#   anchors     RWKV-LM's fused x070 trainer at the same shapes (carry a copy of ../shared/anchors as .anchors/)
#   compare     ours compiled beside RWKV-LM's trainer at B16 T2048, one table
#   issue16     bench/issue16_run.sh: the real-corpus training run and its evaluation (docs/results.md; STAGES=fit
#               or STAGES=eval runs one of the two; ISSUE16_SHARDS=.shards-music21-phase8 trains on a --bar-phase 8
#               build of the same corpus instead. A finished build's .build/ folder (its resume state, 16 MB of
#               the music21 build's 26) is not read by training: delete it before carrying, and both builds and
#               the wheels fit the 64 MiB carry limit)
#   sweep       bench/sampling_sweep.py on the issue16 step's run: temperature x top-p x min-p on the dev val
#               pieces, then the winner's full eval on the test pieces (RESULTS/sweep.tgz)
#   realfit     `musictrain fit` on real packed windows (carry a parquet build as .shards-music21/): base and
#               small presets with --batch-tokens and --compile, and the small preset padded as before
#   complete    bench/complete.py --check, ours beside the rwkv package (prefill eager and as a CUDA graph; decode
#               with the fused step as `complete` runs it, and with the readable step), bf16
#   complete32  bench/complete.py in float32 (`musictrain complete --dtype float32`; bf16 is the default on CUDA), without the rwkv package
#   rows        bench/complete.py, bf16, vocabulary 470: the decode step at 1, 8, 16, 32 and 64 rows (16 candidates
#               per sample are 16 rows), fused and readable, as CUDA graphs and eager, and the fused step with its
#               products also on the CUDA cores instead of tensor cores; its kernels by time, both forms
#   wkv         bench/wkv.py, ours (default configs, with and without resets every 137 positions) beside
#               RWKV-LM's v3 kernels (the anchors' `kernels` mode) in the same step
#   budget      bench/train_step.py --compile at activation memory budgets $BUDGETS [0.5 0.3] (B16 T2048)
#   losscurve   bench/loss_curve.py: 300 steps of `fit` on .shards-music21, the reference path (PyTorch WKV,
#               fp32, eager) against the fast path, same seed
#   lcfloor     bench/loss_curve.py --noise-floor --parallel: the reference, the fast path and the fp32 math through the
#               CUDA kernel (compiled) at once, 300 steps each; how far fp32 rounding alone carries a run from the
#               reference is the floor the fast path's distance is read against (LOSSCURVE_ARGS adds arguments)
#   lceval      the losscurve step's two runs scored alike: `musictrain eval` (float32, 2000 val windows
#               teacher-forced) of each run's checkpoint, so their val difference is not the evaluation's precision
#   wkvwarm     compile every variant of the chunked Triton WKV that wkvcheck and wkvtriton use, 16 processes at once
#   wkvcheck    bench/wkv_chunked_triton.py --check: both forms (one-pass walk, three-pass) forward and backward against
#               float64 at T = 1 .. 4096, fp32 and bf16 inputs, tf32 products rounded (tf32rn; WKVT_ARGS="--precisions tf32" for truncated)
#   wkvtriton   bench/wkv_chunked_triton.py --bench --profile: the chunked Triton WKV timed beside our CUDA kernels
#               (prefill and training shapes), per-kernel times; RESULTS/wkvtriton.json
#   wkvanchor   RWKV-LM's v3 WKV kernels alone (the anchors' `kernels` mode), for the same table
#   anchorbuild build RWKV-LM's v3 WKV extension (ANCHOR_WHAT=model: all its trainer's extensions) only; run it as
#               bg:anchorbuild so that wkvanchor / tscompare start built
#   tscompare   bench/train_step.py --compile at B16 T2048: ours on the CUDA scan and on the chunked Triton WKV, and
#               RWKV-LM's trainer, one table (needs .anchors)
#   recompute   bench/train_step.py --compile at B16 T2048: ours keeping all activations and recomputing the element-wise
#               work, with fp32 master weights and with bf16 weights, and RWKV-LM's trainer, one table (RC_ARGS adds
#               arguments, e.g. --profile 2; RC_CASES picks the cases, WEIGHTS:RECOMPUTE each)
#   kerneltests pytest tests/gpu/test_wkv_cuda.py tests/gpu/test_wkv_triton.py (both WKV kernels, the compiled model;
#               KT_ARGS adds pytest arguments, e.g. -k recompute)
#   tritontests pytest tests/gpu/test_wkv_triton.py and the base-preset test on both kernels (the chunked Triton WKV)
#   fasttests   pytest tests/gpu/test_fast_step.py and test_fast_prefill.py (the fused step and prefill against the readable model)
#   proof       bench/e2e_proof.sh with a 240 s training budget (piano rolls of a GPU-trained model)
#   proof5      bench/e2e_proof.sh with a 300 s training budget on the path FIT_PATH [fast] (or reference), training
#               only (EVAL=0): issue 11's "which path reaches the better val loss in the same 5 minutes"
#   proof5pair  proof5 on both paths at the same time on the one GPU (fast and reference, each its own 300 s), when
#               device time allows no two runs one after the other; RESULTS/proof5-{fast,reference}.log. On the
#               script's own 28 pieces both paths overfit within two minutes (2026-12-07), so for a verdict on speed
#               train on the music21 build: SHARDS=.shards-music21 EVAL_BATCHES=40 EVAL_EVERY=100 STEPS=20000
#   mixpair     proof5's fast path twice at the same time on the one GPU, on SHARDS [.shards-music21], reading the shards
#               in turn (--mix-shards 1, as before 2026-12-07) and mixed (the default): does mixing pieces from across
#               the corpus in each batch give the better val loss in the same 300 s? RESULTS/mix-{1,16}.log
#   ddp         bench/ddp_scaling.sh on 2 GPUs (needs a machine with 2 GPUs)
# A step written bg:STEP runs in the background (e.g. bg:build while Triton compiles); the step `wait` waits for them.
# Limits per step (seconds) come from LIMIT_<STEP>, e.g. LIMIT_TRAINSTEP=200. RESULTS/summary.txt lists each
# step with its exit status and seconds (124: it ran out of time); RESULTS/<step>.log holds its output.
set -uo pipefail

results="${1:?usage: bench/device_session.sh RESULTS [STEP ...]}"
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(wheels build gputests trainstep complete)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
mkdir -p "$results"
results="$(cd "$results" && pwd)"
PY="${PY:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

declare -A limit=([wheels]=120 [build]=240 [gputests]=300 [trainstep]=240 [compile]=300 [complete]=240
                  [complete32]=90 [rows]=180 [proof]=420 [ddp]=420 [anchors]=240 [realfit]=360 [compare]=150 [issue16]=540 [wkv]=240
                  [budget]=240 [losscurve]=420 [sweep]=400
                  [lceval]=120 [fasttests]=120 [wkvtriton]=240 [wkvwarm]=180 [wkvcheck]=200 [wkvanchor]=180
                  [anchorbuild]=240 [tritontests]=240 [tscompare]=360 [recompute]=420 [kerneltests]=300 [proof5]=400 [lcfloor]=420 [proof5pair]=420 [mixpair]=420)
declare -A command=(
    [wheels]="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"
    [build]="$PY -c 'from rwkv_music.model import wkv_cuda as w; ok = w.is_available(); print(\"CUDA WKV extension:\", ok, w.load_error() or \"\"); raise SystemExit(0 if ok else 1)'"
    [gputests]="$PY -m pytest -q -rs tests/gpu tests/model/test_model_gpu.py --ignore tests/gpu/test_wkv_triton.py"
    [trainstep]="$PY bench/train_step.py --only completion --no-fla --profile 3"
    [compile]="$PY bench/train_step.py --only completion --only rwkvlm --rwkvlm .anchors --no-fla --compile; $PY bench/train_step.py --only completion --no-fla --compile --bf16-weights; $PY bench/train_step.py --only completion --only rwkvlm --rwkvlm .anchors --no-fla --compile --batch 8 --seq 4096"
    [compare]="$PY bench/train_step.py --only completion --only rwkvlm --rwkvlm .anchors --no-fla --compile"
    [issue16]="PY=$PY bash bench/issue16_run.sh ${ISSUE16_SHARDS:-.shards-music21} /tmp/issue16 $results"
    [anchors]="cd .anchors/rwkv-lm/train_temp && RWKV_JIT_ON=1 RWKV_KERNEL=@rwkv3 $PY ../../rwkvlm_bench.py model"
    [realfit]="PY=$PY bash bench/real_fit.sh .shards-music21 /tmp/realfit $results"
    [complete]="RWKV_CUDA_ON=1 $PY bench/complete.py --check --steps 300 --json $results/complete.json"
    [rows]="$PY bench/complete.py --no-rwkv-pip --vocab 470 --batches 1 8 16 32 64 --prefill 128 --profile-step --cuda-core-products --json $results/rows.json"
    [complete32]="$PY bench/complete.py --dtype float32 --no-rwkv-pip --prefill 1024 --steps 300 --json $results/complete32.json"
    [proof]="TIME_BUDGET_S=240 PY=$PY bash bench/e2e_proof.sh /tmp/proof $results/proof"
    [wkv]="$PY bench/wkv.py --no-check --impl ours --configs --starts-every 137 --json $results/wkv.json; cd .anchors/rwkv-lm/train_temp && RWKV_JIT_ON=1 RWKV_KERNEL=@rwkv3 $PY ../../rwkvlm_bench.py kernels"
    [budget]="for b in ${BUDGETS:-0.5 0.3}; do $PY bench/train_step.py --only completion --no-fla --compile --memory-budget \$b; done"
    [sweep]="$PY bench/sampling_sweep.py /tmp/issue16/run ${ISSUE16_SHARDS:-.shards-music21} /tmp/sweep --report-test /tmp/sweep-test ${SWEEP_ARGS:-}; rc=\$?; tar czf $results/sweep.tgz -C /tmp sweep/sweep.json sweep-test; exit \$rc"
    [losscurve]="$PY bench/loss_curve.py .shards-music21 /tmp/losscurve ${LOSSCURVE_ARGS:-}"
    [lcfloor]="$PY bench/loss_curve.py .shards-music21 /tmp/lcfloor --noise-floor --parallel --timeout 380 ${LOSSCURVE_ARGS:-}"
    [lceval]="for r in reference fast; do $PY -m rwkv_music.train.cli eval /tmp/losscurve/\$r .shards-music21 --num-windows 0 --choice-windows 0 --piano-rolls 0 -q -o /tmp/lceval-\$r && $PY -c \"import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], r.get('checkpoint'), 'teacher-forced loss', r['teacher_forced']['loss'], 'windows', r['teacher_forced'].get('windows'))\" /tmp/lceval-\$r/report.json \$r; done"
    [fasttests]="$PY -m pytest -q -rs tests/gpu/test_fast_step.py tests/gpu/test_fast_prefill.py"
    [ddp]="PY=$PY OUT=/tmp/ddp-scaling bash bench/ddp_scaling.sh '' 2"
    [wkvwarm]="$PY bench/wkv_chunked_triton.py --warm 16 --warm-only --check --bench ${WKVT_ARGS:-}"
    [wkvcheck]="$PY bench/wkv_chunked_triton.py --check --lengths 1 15 16 17 100 257 4096 ${WKVT_ARGS:-}"
    [wkvtriton]="$PY bench/wkv_chunked_triton.py --bench --profile --json $results/wkvtriton.json ${WKVT_ARGS:-}"
    [anchorbuild]="cd .anchors/rwkv-lm/train_temp && RWKV_JIT_ON=1 RWKV_KERNEL=@rwkv3 $PY -c \"import os, sys; sys.path[:0] = [os.getcwd(), '../..']; import rwkvlm_bench as m; m.prebuild('${ANCHOR_WHAT:-kernels}')\""
    [tscompare]="$PY bench/train_step.py --only completion --only rwkvlm --rwkvlm .anchors --no-fla --compile --wkv cuda triton --json $results/tscompare.json"
    [tritontests]="$PY -m pytest -q -rs tests/gpu/test_wkv_triton.py tests/gpu/test_wkv_cuda.py -k 'triton or base_preset'"
    [proof5]="TIME_BUDGET_S=300 EVAL_EVERY=${EVAL_EVERY:-50} EVAL=0 FIT_PATH=${FIT_PATH:-fast} PY=$PY bash bench/e2e_proof.sh /tmp/proof5-${FIT_PATH:-fast}"
    [proof5pair]="for p in fast reference; do TIME_BUDGET_S=300 EVAL_EVERY=\${EVAL_EVERY:-50} EVAL=0 FIT_PATH=\$p PY=$PY bash bench/e2e_proof.sh /tmp/proof5-\$p > $results/proof5-\$p.log 2>&1 & done; wait; grep -H 'fit exit\\|best val\\|val loss (step' $results/proof5-*.log"
    [mixpair]="for m in 1 16; do SHARDS=\${SHARDS:-.shards-music21} EVAL_BATCHES=\${EVAL_BATCHES:-40} STEPS=20000 TIME_BUDGET_S=300 EVAL_EVERY=\${EVAL_EVERY:-100} EVAL=0 FIT_PATH=fast FIT_ARGS=\"--mix-shards \$m\" PY=$PY bash bench/e2e_proof.sh /tmp/mix-\$m > $results/mix-\$m.log 2>&1 & done; wait; grep -H 'fit exit\\|best val\\|val loss (step' $results/mix-*.log"
    [recompute]="$PY bench/train_step.py --only completion --only rwkvlm --rwkvlm .anchors --no-fla --compile \$(for c in ${RC_CASES:-fp32:none fp32:elementwise bf16:none bf16:elementwise}; do echo --case \$c; done) --json $results/recompute.json ${RC_ARGS:-}"
    [kerneltests]="$PY -m pytest -q -rs tests/gpu/test_wkv_cuda.py tests/gpu/test_wkv_triton.py ${KT_ARGS:-}"
    [wkvanchor]="cd .anchors/rwkv-lm/train_temp && RWKV_JIT_ON=1 RWKV_KERNEL=@rwkv3 $PY ../../rwkvlm_bench.py kernels"
)

{
    date -u +"%Y-%m-%d %H:%M:%S UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1
} > "$results/summary.txt"

run_step() {  # run_step STEP: one step under its limit, its status and seconds appended to the summary
    local step="$1" var secs start rc
    var="LIMIT_${step^^}"
    secs="${!var:-${limit[$step]}}"
    echo "== $step (limit ${secs}s)" >&2
    start=$(date +%s)
    timeout --kill-after=10 "$secs" bash -c "${command[$step]}" > "$results/$step.log" 2>&1
    rc=$?
    echo "$step rc=$rc $(( $(date +%s) - start ))s" | tee -a "$results/summary.txt" >&2
    return $rc
}

for step in "${steps[@]}"; do
    if [ "$step" = wait ]; then
        wait
        continue
    fi
    bg=0
    if [ "${step#bg:}" != "$step" ]; then
        bg=1
        step="${step#bg:}"
    fi
    if [ -z "${command[$step]:-}" ]; then
        echo "unknown step '$step' (known: ${!command[*]} wait)" | tee -a "$results/summary.txt" >&2
        continue
    fi
    if [ $bg = 1 ]; then
        run_step "$step" &
        continue
    fi
    run_step "$step"
    rc=$?
    if [ "$step" = wheels ] && [ $rc -eq 0 ]; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
done
wait
# (the device tool returns at most 8 files: set NO_TAILS=1 when the logs themselves are enough, PACK_LOGS=1 to
# put every log into RESULTS/logs.tgz instead of leaving them one file each)
[ -n "${NO_TAILS:-}" ] || tail -n 3 "$results"/*.log > "$results/tails.txt" 2>/dev/null || true
if [ -n "${PACK_LOGS:-}" ]; then
    (cd "$results" && tar czf logs.tgz ./*.log && rm -f ./*.log)
fi
