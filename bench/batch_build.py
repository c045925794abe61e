"""How long `musictrain fit` takes to build one training batch in its main thread (--num-workers 0, the default).

    python bench/batch_build.py SHARDS [--batch-tokens 32768] [--pack-len 2048] [--batches 30]

Before 2026-12-07 fit read the loss and the grad norm after every step, so it waited for the GPU there, and
with no data workers the next batch was then built while the GPU idled; now a step queues its work and returns,
and the batch is built while the GPU runs the step before. This times that build: the trainer's own data stream
(`Trainer.stream`, through `fit._batches`, as `Trainer.run` iterates it), one torch thread, after one untimed
batch. Padded batches with --batch-tokens 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from rwkv_music.train.config import TrainConfig
from rwkv_music.train.fit import DistInfo, Trainer, _batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--batch-tokens", type=int, default=32768, help="positions per packed batch (0: padded batches)")
    ap.add_argument("--pack-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16, help="windows per padded batch")
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(shards=args.shards, out=out, preset="tiny", n_layer=1, n_embd=64, device="cpu",
                          batch_tokens=args.batch_tokens or None, pack_len=args.pack_len, batch_size=args.batch_size,
                          progress=False, tensorboard=False, max_steps=args.batches + 1)
        trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))
        batches = _batches(trainer.stream, 0, 0, 0, pin=False)
        next(batches)
        t = time.perf_counter()
        positions = 0
        for _ in range(args.batches):
            positions += next(batches).batch["input_ids"].numel()
        dt = (time.perf_counter() - t) / args.batches
    print(json.dumps({"ms_per_batch": round(dt * 1e3, 2), "positions_per_batch": positions // args.batches,
                      "batch_tokens": args.batch_tokens, "cpu": platform.processor() or platform.machine(),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
