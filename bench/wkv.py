"""WKV7 on CUDA: accuracy against float64 and fwd+bwd timing against FLA and the PyTorch fallback.

Run on a GPU machine from the repository root:
    python3 bench/wkv.py                      # check + time (ours, fla if importable, torch fallback)
    python3 bench/wkv.py --no-check --configs 0,0 1,2 --impl ours fla
Prints a table of medians (triton do_bench, fwd+bwd, bf16, head size 64) and the accuracy figures;
--json PATH also writes them.  Inputs are shaped like the model's: kk L2-normalised per head,
a = -kk, b = kk * iclr, iclr = sigmoid(.), raw decay logits w ~ N(0, 2^2).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_music.model import wkv_cuda
from rwkv_music.model.wkv import log_decay, wkv_chunked, wkv_reference

SHAPES = [(8, 4096, 12), (16, 2048, 12), (4, 2048, 12), (8, 4096, 64)]
GOALS = {(8, 4096, 12): 4.0, (16, 2048, 12): 3.0, (4, 2048, 12): 2.5, (8, 4096, 64): 9.8}
CHECK_SHAPES = [(2, 100, 3, True), (1, 16, 1, False), (3, 257, 2, True), (1, 1, 2, True), (2, 45, 4, False)]
N = 64


def make_inputs(B, T, H, dtype, device, gen, state=True):
    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    w = rn(B, T, H, N, scale=2.0)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen, device=device), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=gen, device=device))
    a, b = (-kk).to(dtype), (kk * iclr).to(dtype)
    s0 = torch.randn(B, H, N, N, generator=gen, device=device) * 0.5 if state else None
    return [r, w, k, v, a, b], s0


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_one(B, T, H, use_state, dtype, cfg, gen, device):
    xs, s0 = make_inputs(B, T, H, dtype, device, gen, use_state)
    dy = torch.randn(B, T, H, N, generator=gen, device=device).to(dtype)
    dsT = torch.randn(B, H, N, N, generator=gen, device=device)
    # float64 reference with autograd
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref_s0 = s0.double().requires_grad_() if s0 is not None else None
    y_ref, sT_ref = wkv_reference(*ref_in, ref_s0)
    torch.autograd.backward([y_ref, sT_ref], [dy.double(), dsT.double()])
    # ours, twice (a result that moves between runs means a race)
    outs = []
    for _ in range(2):
        ins = [x.detach().clone().requires_grad_() for x in xs]
        st = s0.clone().requires_grad_() if s0 is not None else None
        y, sT = wkv_cuda.wkv_cuda(*ins, st, cfg=cfg)
        torch.autograd.backward([y, sT], [dy, dsT])
        outs.append([y, sT] + [t.grad for t in ins] + ([st.grad] if st is not None else []))
    same = all(torch.equal(p, q) for p, q in zip(*outs, strict=True))
    names = ["y", "sT", "dr", "dw", "dk", "dv", "da", "db"] + (["ds0"] if s0 is not None else [])
    refs = [y_ref, sT_ref] + [t.grad for t in ref_in] + ([ref_s0.grad] if s0 is not None else [])
    errs = {n: rel(o, rf) for n, o, rf in zip(names, outs[0], refs, strict=True)}
    finite = all(torch.isfinite(o).all().item() for o in outs[0])
    return errs, same, finite


def check_step(gen, device):
    errs = {}
    for dtype in (torch.bfloat16, torch.float32):
        B, H = 5, 3
        xs, s0 = make_inputs(B, 1, H, dtype, device, gen, True)
        xs1 = [x[:, 0].contiguous() for x in xs]
        y, s = wkv_cuda.wkv_cuda_step(*xs1, s0)
        y_ref, s_ref = wkv_reference(*xs, s0)
        st = s0.clone()
        y2, s2 = wkv_cuda.wkv_cuda_step(*xs1, st, out=st)  # in place
        errs[str(dtype).split(".")[-1]] = {
            "y": rel(y, y_ref[:, 0]),
            "s": rel(s, s_ref),
            "inplace_equal": bool(torch.equal(s2, s) and torch.equal(y2, y) and s2.data_ptr() == st.data_ptr()),
        }
    return errs


def run_checks(configs, device):
    gen = torch.Generator(device=device).manual_seed(1234)
    rows = []
    worst = 0.0
    for cfg in configs:
        for dtype in (torch.bfloat16, torch.float32):
            for B, T, H, st in CHECK_SHAPES:
                errs, same, finite = check_one(B, T, H, st, dtype, cfg, gen, device)
                m = max(errs.values())
                if dtype == torch.bfloat16:
                    worst = max(worst, m)
                rows.append({"cfg": list(cfg), "dtype": str(dtype).split(".")[-1], "B": B, "T": T, "H": H,
                             "state": st, "errs": errs, "deterministic": same, "finite": finite, "max": m})
                flag = "ok" if (m < 3e-3 and same and finite) else "FAIL"
                print(f"check cfg={cfg} {rows[-1]['dtype']:8s} B{B} T{T} H{H} state={st!s:5s} max={m:.2e} "
                      f"det={same} {flag}  " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return rows, worst


def fla_fn():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # not installed here
        print(f"fla unavailable: {e}")
        return None

    def f(r, w, k, v, a, b, s0):
        y, _ = chunk_rwkv7(r, log_decay(w.float()).to(r.dtype), k, v, a, b, scale=1.0, initial_state=s0,
                           output_final_state=True)
        return y

    return f


def _ours(cfg):
    return lambda *x: wkv_cuda.wkv_cuda(*x[:6], x[6], cfg=cfg)[0]


def _ours_starts(every):
    """Default configs on packed rows: a reset every `every` positions (the music21 windows' mean length is
    137), so the reset code paths are timed as training on packed batches runs them."""
    cache = {}

    def f(r, *x):
        B, T = r.shape[:2]
        if (B, T) not in cache:
            cache[B, T] = (torch.arange(T, device=r.device) % every == 0).expand(B, T).contiguous()
        return wkv_cuda.wkv_cuda(r, *x[:5], x[5], starts=cache[B, T])[0]

    return f


def time_impl(fn, B, T, H, device, gen, reps_ms):
    import triton.testing

    xs, _ = make_inputs(B, T, H, torch.bfloat16, device, gen, False)
    xs = [x.requires_grad_() for x in xs]
    dy = torch.randn(B, T, H, N, generator=gen, device=device).to(torch.bfloat16)

    def step():
        y = fn(*xs, None)
        torch.autograd.backward(y, dy)

    step()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(step, warmup=25, rep=reps_ms, grad_to_none=xs, return_mode="median")
    torch.cuda.empty_cache()
    return ms


def profile_kernels(fn, B, T, H, device, gen, iters=3):
    """Mean CUDA time per kernel (ms) over `iters` fwd+bwd steps, by short kernel name."""
    from torch.profiler import ProfilerActivity, profile

    xs, _ = make_inputs(B, T, H, torch.bfloat16, device, gen, False)
    xs = [x.requires_grad_() for x in xs]
    dy = torch.randn(B, T, H, N, generator=gen, device=device).to(torch.bfloat16)
    for _ in range(2):
        torch.autograd.backward(fn(*xs, None), dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.backward(fn(*xs, None), dy)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t <= 0:
            continue
        name = ev.key
        for tag in ("fwd_kernel", "bwd1_kernel", "bwd2_kernel"):
            if tag in name:
                name = tag
        out[name[:60]] = out.get(name[:60], 0.0) + t / 1000.0 / iters
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--configs", nargs="*", default=None, help="fwd,bwd1,bwd2 config triples, e.g. 0,0,0 1,1,2 "
                    "(none given: the default configs only) [all]")
    ap.add_argument("--check-configs", nargs="*", default=None, help="triples to check (default: --configs)")
    ap.add_argument("--impl", nargs="*", default=["ours", "fla", "torch"])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H triples")
    ap.add_argument("--rep", type=float, default=200.0, help="do_bench rep in ms")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="per-kernel times of each config of ours")
    ap.add_argument("--starts-every", type=int, default=0, metavar="N",
                    help="Also time ours (default configs) with a state reset every N positions (packed rows).")
    args = ap.parse_args()

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": props.name,
            "sms": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "argv": sys.argv}
    print(json.dumps(info))
    t0 = time.time()
    ok = wkv_cuda.is_available()
    print(f"build/load: {ok} in {time.time() - t0:.1f}s {wkv_cuda.load_error() or ''}", flush=True)
    if not ok:
        sys.exit(1)
    # --configs with no triple: the default (auto) configs only, the ones a build without
    # RWKV_MUSIC_WKV_ALL_CONFIGS=1 compiles
    configs = ([tuple(int(c) for c in s.split(",")) for s in args.configs] if args.configs is not None
               else [(c, c, c) for c in range(wkv_cuda.N_CONFIGS)])
    check_configs = [tuple(int(c) for c in s.split(",")) for s in args.check_configs] if args.check_configs else configs
    shapes = [tuple(int(c) for c in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    result = {"info": info}
    if not args.no_check:
        result["check"], worst = run_checks(check_configs, device)
        result["check_step"] = check_step(torch.Generator(device=device).manual_seed(7), device)
        print("step:", json.dumps(result["check_step"]))
        print(f"worst bf16 rel L2 error over all checks: {worst:.2e}", flush=True)
    if args.profile:
        gen = torch.Generator(device=device).manual_seed(0)
        result["profile"] = {}
        for shape in shapes:
            for cfg in configs:
                ks = profile_kernels(_ours(cfg), *shape, device, gen)
                result["profile"][f"{shape} {cfg}"] = ks
                top = sorted(ks.items(), key=lambda kv: -kv[1])[:5]
                print(f"profile {shape} cfg={cfg}: " + ", ".join(f"{k}={v:.3f}" for k, v in top), flush=True)
    best = {}
    if args.profile:  # per shape, the fastest kernel of each kind among the profiled configs
        for shape in shapes:
            pick = []
            for pos, tag in enumerate(("fwd_kernel", "bwd1_kernel", "bwd2_kernel")):
                cands = [(result["profile"][f"{shape} {cfg}"].get(tag, 1e9), cfg[pos]) for cfg in configs]
                pick.append(min(cands)[1])
            best[shape] = tuple(pick)
            print(f"best per kernel for {shape}: {best[shape]}")
        result["best"] = {str(k): v for k, v in best.items()}
    if not args.no_time:
        gen = torch.Generator(device=device).manual_seed(0)
        timings = {}
        impls = {}
        for name in args.impl:
            if name == "ours":
                for cfg in configs:
                    impls["ours" + "".join(map(str, cfg))] = _ours(cfg)
                impls["ours_auto"] = lambda *x: wkv_cuda.wkv_cuda(*x[:6], x[6])[0]
                if args.starts_every:
                    impls[f"ours_starts{args.starts_every}"] = _ours_starts(args.starts_every)
            elif name == "fla":
                f = fla_fn()
                if f is not None:
                    impls["fla"] = f
            elif name == "torch":
                impls["torch"] = lambda *x: wkv_chunked(*x)[0]
        for shape in shapes:
            shape_impls = dict(impls)
            if shape in best:
                shape_impls["ours_best"] = _ours(best[shape])
            for name, fn in shape_impls.items():
                if name == "torch" and math.prod(shape) > 8 * 4096 * 12:
                    continue  # the fallback at the largest shapes only costs device time
                try:
                    ms = time_impl(fn, *shape, device, gen, args.rep)
                except Exception as e:
                    print(f"{name} {shape}: failed {type(e).__name__}: {str(e)[:200]}")
                    ms = float("nan")
                timings.setdefault(str(shape), {})[name] = ms
                print(f"time {name:10s} B{shape[0]} T{shape[1]} H{shape[2]}: {ms:8.3f} ms", flush=True)
        result["timings"] = timings
        names = list(impls) + (["ours_best"] if best else [])
        print("\n| B, T, H | " + " | ".join(names) + " | goal |")
        print("|" + "---|" * (len(names) + 2))
        for shape in shapes:
            row = timings[str(shape)]
            cells = [f"{row[n]:.2f} ms" if n in row else "-" for n in names]
            goal = GOALS.get(shape, "-")
            print(f"| {shape[0]}, {shape[1]}, {shape[2]} | " + " | ".join(cells) + f" | <= {goal} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
