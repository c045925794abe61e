#!/usr/bin/env bash
# Set everything up in .venv and run the whole path on the bundled demo corpus, on the CPU:
# shards (embedded Dask LocalCluster) -> a tiny RWKV-7 trained briefly -> a completed prompt (MIDI + piano roll).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
venv="${RWKV_MUSIC_VENV:-$root/.venv}"
out="${DEMO_OUT:-$root/demo-out}"
steps="${DEMO_STEPS:-300}"
export PATH="$venv/bin:$PATH"
corpus="$root/examples/demo-corpus"
# The first 16 bars of "Mr. Blue Sky" from the demo corpus; the split puts that piece in val, so the model
# continues music it was not trained on.
prompt="$root/examples/demo-prompt.mid"

echo "== 1/3 build shards from $corpus"
musicprep build-shards "$corpus" -o "$out/shards" --workers 2 --max-seq-len 512 --samples-per-shard 512 \
    --val-fraction 0.25 --overwrite
echo "== 2/3 train the tiny preset for $steps steps on the CPU"
# A repeated demo starts its run and completions afresh (fit refuses to train into an existing run without
# --resume; the shards above are reused when nothing changed).
rm -rf "$out/run" "$out/completions"
musictrain fit "$out/shards" -o "$out/run" --preset tiny --max-steps "$steps" --batch-size 8 \
    --eval-every 100 --save-every 100 --device cpu
echo "== 3/3 continue $(basename "$prompt") (its last 4 bars as context) with 2 new bars, 4 variations"
musictrain complete "$out/run" "$prompt" -o "$out/completions" --bars 2 --context-bars 4 --num-samples 4 \
    --seed 0 --device cpu --plot

cat <<MSG

Done. Everything is under $out:
  shards       $out/shards        (manifest.json, train/ and val/ as Parquet + WebDataset)
  run          $out/run           (checkpoints/, metrics.jsonl, loss.png, tb/)
  completions  $out/completions   (sample-K.mid, sample-K-continuation.mid, piano rolls *.png)
MSG
