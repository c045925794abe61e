"""CPU benchmark of the RWKV-7 model: training throughput, RNN-step throughput, peak memory.

    python bench/model_cpu.py                # all measurements, markdown table on stdout
    python bench/model_cpu.py --only train   # or: step, memory

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to that case alone.
Memory is reported as the peak RSS during one forward+backward minus the RSS just before it, measured
with glibc's MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors leave RSS at once (otherwise the
high-water mark mostly shows allocator caching, not what the model needs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rwkv_music.model import RWKV7, from_preset


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _model(preset: str, vocab: int, grad_checkpoint: bool = False) -> RWKV7:
    torch.manual_seed(0)
    model = RWKV7(from_preset(preset, vocab))
    model.grad_checkpoint = grad_checkpoint
    return model


def run_train(preset: str, vocab: int, B: int, T: int, reps: int) -> dict:
    """tokens/s of forward + cross-entropy + backward (full logits), after one warm-up."""
    model = _model(preset, vocab).train()
    idx = torch.randint(0, vocab, (B, T + 1))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    best = min(times[1:])
    return {"params": model.num_params(), "sec_per_step": best, "tok_per_s": B * T / best}


def run_step(preset: str, vocab: int, B: int, n: int) -> dict:
    """tokens/s of RNN-mode generation steps (no grad), batch B."""
    model = _model(preset, vocab).eval()
    tok = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        _, state = model.step(tok, None)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, state = model.step(tok, state)
            tok = logits.argmax(-1)
        dt = time.perf_counter() - t0
    return {"ms_per_step": 1000 * dt / n, "tok_per_s": B * n / dt}


def run_memory(preset: str, vocab: int, B: int, T: int, sliced: bool, frac: float, ckpt: bool) -> dict:
    """Peak RSS growth of one forward+backward at [B, T], with the LM head on all or on masked positions."""
    model = _model(preset, vocab, grad_checkpoint=ckpt).train()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (B, T + 1), generator=g)
    mask = torch.rand(B, T, generator=g) < frac
    targets = idx[:, 1:][mask]
    base = _rss_mib()
    t0 = time.perf_counter()
    if sliced:
        loss = F.cross_entropy(model(idx[:, :-1], positions=mask), targets)
    else:
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits[mask], targets)
    loss.backward()
    dt = time.perf_counter() - t0
    return {"peak_growth_mib": _peak_mib() - base, "sec": dt}


def _sub(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps({"kind": kind, **kw})]
    env = dict(os.environ)
    if kind == "memory":  # large blocks via mmap, returned on free: RSS then follows live tensor memory
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--only", choices=["train", "step", "memory"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        kind = spec.pop("kind")
        fn = {"train": run_train, "step": run_step, "memory": run_memory}[kind]
        print(json.dumps(fn(**spec)))
        return

    v = args.vocab
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, vocab {v}, load average at start {load}\n")
    if args.only in (None, "train"):
        print("| preset | params | B x T | s / step | tokens/s (fwd+bwd) |\n|---|---|---|---|---|")
        for preset, B, T in (("tiny", 8, 512), ("tiny", 4, 2048), ("small", 4, 512)):
            r = _sub("train", preset=preset, vocab=v, B=B, T=T, reps=5)
            print(f"| {preset} | {r['params'] / 1e6:.2f} M | {B} x {T} | {r['sec_per_step']:.2f} | "
                  f"{r['tok_per_s']:.0f} |")
        print()
    if args.only in (None, "step"):
        print("| preset | B | ms / step | tokens/s (RNN step) |\n|---|---|---|---|")
        for preset, B in (("tiny", 1), ("tiny", 16), ("small", 1), ("small", 16)):
            r = _sub("step", preset=preset, vocab=v, B=B, n=100)
            print(f"| {preset} | {B} | {r['ms_per_step']:.2f} | {r['tok_per_s']:.0f} |")
        print()
    if args.only in (None, "memory"):
        print("| preset | vocab | B x T | LM head on | grad ckpt | peak RSS growth (MiB) |")
        print("|---|---|---|---|---|---|")
        for preset, B, vocab in (("tiny", 4, v), ("small", 1, v), ("tiny", 4, 65536)):
            for sliced, ckpt in ((False, False), (True, False), (True, True)):
                r = _sub("memory", preset=preset, vocab=vocab, B=B, T=2048, sliced=sliced, frac=0.25, ckpt=ckpt)
                head = "25% (positions=mask)" if sliced else "all positions"
                print(f"| {preset} | {vocab} | {B} x 2048 | {head} | {'yes' if ckpt else 'no'} | "
                      f"{r['peak_growth_mib']:.0f} |")


if __name__ == "__main__":
    main()
