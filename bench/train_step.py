"""Training-step throughput of our RWKV-7 against FLA's RWKV7ForCausalLM, same shape, one run.

    python bench/train_step.py                      # base preset, batch 16 x 2048, bf16 autocast, on CUDA
    python bench/train_step.py --preset tiny --batch 2 --seq 128 --steps 3 --device cpu   # smoke test

A step is what `musictrain fit` does per optimiser step: forward under bf16 autocast (fp32 master weights),
cross-entropy, backward, gradient clipping at 1.0, fused AdamW (RWKV-LM's groups for ours). Cases:
  ours/completion  the LM head only on the completion positions (--completion-frac of each row, the
                   last ones, as in training windows): what the trainer runs
  ours/all         the LM head on every position (the same work as a plain LM)
  fla              fla.models.RWKV7ForCausalLM with labels (its fused CE), skipped if `fla` is not installed
  rwkv-lm          with --rwkvlm DIR (a copy of ../shared/anchors): RWKV-LM's own fused x070 trainer at the
                   same shape, timed by the anchors' rwkvlm_bench.py in a subprocess (bf16 weights, its
                   fused CUDA kernels, logits on every position)
tokens/s counts every input token (B x T) per step. MFU = model FLOPs / step time / --peak-tflops, with
model FLOPs = 6 x (non-embedding matmul parameters) x tokens + 6 x n_embd x vocab x (positions given logits)
+ the WKV state recurrence (about 18 x head_size x n_embd per token per layer, forward + backward).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from rwkv_music.model import RWKV7, from_preset
from rwkv_music.model.compile import compile_for_training
from rwkv_music.model.recompute import RECOMPUTE
from rwkv_music.model.wkv import BACKENDS
from rwkv_music.remi.tokenizer import build_tokenizer
from rwkv_music.train.config import TrainConfig
from rwkv_music.train.master_weights import BF16Compute
from rwkv_music.train.optim import make_optimizer

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def model_flops_per_step(model: RWKV7, B: int, T: int, n_logits: int) -> float:
    cfg = model.cfg
    emb_head = 2 * cfg.vocab_size * cfg.n_embd
    dense = sum(p.numel() for p in model.parameters() if p.dim() == 2) - emb_head
    wkv = 18 * cfg.head_size * cfg.n_embd * cfg.n_layer
    return 6.0 * dense * B * T + 6.0 * cfg.n_embd * cfg.vocab_size * n_logits + float(wkv) * B * T


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, peak GiB) after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dt, peak


def profile_steps(step, device: torch.device, steps: int, top: int, title: str) -> None:
    """Print the `top` kernels/ops by self device time over `steps` steps (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n[profile] {title}: {steps} steps, sorted by {key}", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70), file=sys.stderr,
          flush=True)


def bench_ours(args, device, vocab: int, frac: float | None, wkv: str | None = None, recompute: str = "none",
               bf16_weights: bool = False) -> dict:
    torch.manual_seed(0)
    model = RWKV7(from_preset(args.preset, vocab)).to(device)
    if wkv is not None:
        model.wkv_backend = wkv
    bf16 = BF16Compute(model) if bf16_weights else None  # fit --precision bf16-weights: fp32 masters for AdamW
    compute = model if bf16 is None else bf16.model
    compute.recompute = recompute
    cfg = TrainConfig(lr=1e-4, warmup_steps=0)
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    fwd = compile_for_training(compute, memory_budget=args.memory_budget) if args.compile else compute
    B, T = args.batch, args.seq
    idx = torch.randint(0, vocab, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    if frac is not None:
        mask[:, : T - max(1, round(frac * T))] = False
    targets = torch.randint(0, vocab, (int(mask.sum()),), device=device)
    flat = mask.flatten().nonzero().flatten()  # as fit selects them: flat indices, found once (collate's job there)
    amp = device.type == "cuda" and not bf16_weights

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = fwd(idx, flat_positions=flat)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        if bf16 is not None:
            bf16.grads_to_master()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16 is not None:
            bf16.master_to_compute()

    dt, peak = time_steps(step, device, args.warmup, args.steps)
    flops = model_flops_per_step(model, B, T, int(mask.sum()))
    name = "ours/all" if frac is None else f"ours/completion {frac:.2f}"
    name += " compiled" if args.compile else ""
    name += " bf16 weights" if bf16_weights else ""
    name += f" budget {args.memory_budget:g}" if args.compile and args.memory_budget is not None else ""
    name += f" recompute {recompute}" if recompute != "none" else ""
    name += f" wkv {model.backend(device).name}"
    if args.profile:
        profile_steps(step, device, args.profile, args.profile_top, name)
    return {"case": name, "ms_per_step": dt * 1e3, "tokens_per_s": B * T / dt, "peak_gib": peak,
            "tflops": flops / dt / 1e12, "params": model.num_params()}


def bench_fla(args, device, vocab: int) -> dict | None:
    try:
        from fla.models import RWKV7Config as FlaConfig
        from fla.models import RWKV7ForCausalLM
    except Exception as e:  # not installed, or its Triton kernels do not import here
        print(f"[bench] FLA skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    ours = from_preset(args.preset, vocab)
    torch.manual_seed(0)
    fcfg = FlaConfig(hidden_size=ours.n_embd, num_hidden_layers=ours.n_layer, head_dim=ours.head_size,
                     vocab_size=vocab, intermediate_size=ours.dim_ffn)
    model = RWKV7ForCausalLM(fcfg).to(device)
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-18,
                            fused=device.type == "cuda")
    B, T = args.batch, args.seq
    idx = torch.randint(0, vocab, (B, T), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=idx, labels=idx)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt, peak = time_steps(step, device, args.warmup, args.steps)
    if args.profile:
        profile_steps(step, device, args.profile, args.profile_top, "fla")
    n_params = sum(p.numel() for p in model.parameters())
    # same FLOP model as ours (same shape), logits on every position
    ref = RWKV7(from_preset(args.preset, vocab), init_weights=False)
    flops = model_flops_per_step(ref, B, T, B * T)
    return {"case": "fla", "ms_per_step": dt * 1e3, "tokens_per_s": B * T / dt, "peak_gib": peak,
            "tflops": flops / dt / 1e12, "params": n_params}


def bench_rwkvlm(args, vocab: int) -> dict | None:
    """RWKV-LM's trainer via the anchors' own script (it builds its kernels first; JSON lines on stdout)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(args.rwkvlm).resolve()
    env = {**os.environ, "RWKV_JIT_ON": "1", "RWKV_KERNEL": "@rwkv3", "BENCH_V": str(vocab),
           "BENCH_BT": f"{args.batch}x{args.seq}"}
    proc = subprocess.run([sys.executable, str(root / "rwkvlm_bench.py"), "model"], cwd=root / "rwkv-lm" / "train_temp",
                          env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{") and "rwkvlm_model" in line]
    if proc.returncode != 0 or not rows:
        print(f"[bench] RWKV-LM failed (rc {proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    r = rows[-1]
    ref = RWKV7(from_preset(args.preset, vocab), init_weights=False)
    dt = r["ms_per_step"] / 1e3
    return {"case": "rwkv-lm fused trainer", "ms_per_step": r["ms_per_step"], "tokens_per_s": r["tokens_per_s"],
            "peak_gib": r["peak_gib"], "tflops": model_flops_per_step(ref, args.batch, args.seq,
                                                                      args.batch * args.seq) / dt / 1e12,
            "params": r["params_M"] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--completion-frac", type=float, default=1 / 3,
                    help="Share of positions given logits in ours/completion (2 of 6 bars in default windows).")
    ap.add_argument("--vocab", type=int, default=None, help="Vocabulary size [the project's REMI tokenizer's].")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--grad-checkpoint", action="store_true", help="The same as --recompute blocks.")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=["none"],
                    help="What backward recomputes in our model (model/recompute.py); several: each timed in turn.")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="Ours computing with bf16 weights and no autocast (RWKV-LM's way), AdamW on fp32 masters "
                         "(fit --precision bf16-weights), instead of bf16 autocast over the fp32 weights.")
    ap.add_argument("--weights", nargs="+", choices=["fp32", "bf16"], default=None,
                    help="Ours with fp32 master weights under bf16 autocast, bf16 weights (--bf16-weights), or both "
                         "in turn.")
    ap.add_argument("--memory-budget", type=float, default=None, metavar="F",
                    help="With --compile: AOTAutograd's activation memory budget (0..1; below 1 recomputes "
                         "element-wise activations in backward to save memory).")
    ap.add_argument("--case", action="append", default=None, metavar="WEIGHTS:RECOMPUTE",
                    help="Time ours with these weights (fp32 | bf16) and recompute mode, e.g. bf16:elementwise; "
                         "repeatable, in the order given (replaces --weights, --recompute, --bf16-weights and "
                         "--grad-checkpoint).")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--wkv", nargs="+", default=[None], choices=BACKENDS,
                    help="Our model's WKV backend(s), each timed in turn [RWKV_MUSIC_WKV or auto].")
    ap.add_argument("--only", choices=["completion", "all", "fla", "rwkvlm"], action="append")
    ap.add_argument("--rwkvlm", default=None, metavar="DIR",
                    help="Also time RWKV-LM's trainer: DIR holds rwkvlm_bench.py and rwkv-lm/ (../shared/anchors).")
    ap.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak [from the GPU name].")
    ap.add_argument("--json", default=None, help="Also write the results here.")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="After timing, profile N more steps per case and print the top kernels (stderr).")
    ap.add_argument("--profile-top", type=int, default=30, help="Rows of the profile table.")
    args = ap.parse_args()

    device = torch.device(args.device)
    vocab = args.vocab or len(build_tokenizer())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), math.nan)
    only = set(args.only or ["completion", "all", "fla"])
    recomputes = ["blocks"] if args.grad_checkpoint else args.recompute
    weights = args.weights or (["bf16"] if args.bf16_weights else ["fp32"])
    pairs = list(itertools.product(weights, recomputes))
    if args.case:
        pairs = [(c.partition(":")[0], c.partition(":")[2]) for c in args.case]
        bad = [c for c, (w, r) in zip(args.case, pairs, strict=True) if w not in ("fp32", "bf16") or r not in RECOMPUTE]
        if bad:
            ap.error(f"--case takes WEIGHTS:RECOMPUTE, weights fp32|bf16, recompute {'|'.join(RECOMPUTE)}: {bad}")
    rows = []
    for frac in [args.completion_frac] * ("completion" in only) + [None] * ("all" in only):
        for wkv, (w, recompute) in itertools.product(args.wkv, pairs):
            rows.append(bench_ours(args, device, vocab, frac, wkv, recompute, bf16_weights=w == "bf16"))
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
            torch._dynamo.reset()  # frees the compiled case's graphs (and the model they hold) before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "fla" in only and not args.no_fla:
        r = bench_fla(args, device, vocab)
        if r:
            rows.append(r)
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
    if args.rwkvlm and ("rwkvlm" in only or not args.only):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = bench_rwkvlm(args, vocab)
        if r:
            rows.append(r)
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
    for r in rows:
        r["mfu"] = r["tflops"] / peak if math.isfinite(peak) else None

    print(f"\n{args.preset} preset, vocab {vocab}, batch {args.batch} x {args.seq}, "
          f"{'bf16 (autocast, or bf16 weights where the case says)' if device.type == 'cuda' else 'fp32'}, {name}, "
          f"torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}")
    print("| case | params | ms/step | tokens/s | peak GiB | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_gib']:.1f} | {r['tflops']:.1f} | {mfu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
