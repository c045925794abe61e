"""Generation speed: our prefill and decode step against BlinkDL's `rwkv` package, on one random model shape.

Run from the repository root:
    python3 bench/complete.py                                   # CUDA: L12 D768 vocab 640 (the issue's shape)
    python3 bench/complete.py --device cpu --presets tiny small  # the CPU figures of docs/benchmarks.md
Prints one table. Rows:
  prefill   one parallel forward over --prefill tokens (batch 1), state out: on CUDA first as `complete` runs
            it with no flags (`train.complete.prefill` with the fused kernels of `FastStep.prefill`, prompt
            given as a token list), then the readable forward eager and as a CUDA graph
  step      the model step alone (RNN mode): on CUDA the fused kernels of `model/fast_step.py` (what
            `complete` runs by default) and the readable `model.step`, eager and as a CUDA graph
  generate  the decode step `musictrain complete` runs: grammar mask + top-p sampling + grammar update +
            model step (CUDA: one CUDA graph replay), prompt from examples/demo-corpus
  compiled  (--compile) the same with the readable step torch.compile'd (model step alone / whole decode step)
  rwkv-pip  the `rwkv` package (0.8.x, x070): RWKV(...).forward(tokens, None) and forward([tok], state),
            batch 1 only (the package has no batched RNN step); run in a subprocess because its settings
            are environment variables read at import (RWKV_CUDA_ON=1 builds its CUDA kernel).
Times are medians over --repeats (prefill) or means over --steps (decode), after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_music.model import RWKV7, RWKV7Config, from_preset, save_rwkv_lm  # noqa: E402
from rwkv_music.model.fast_step import FastStep  # noqa: E402
from rwkv_music.remi.grammar import BatchedGrammar, RemiGrammar  # noqa: E402
from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score  # noqa: E402
from rwkv_music.remi.windows import Vocab, build_prompt  # noqa: E402
from rwkv_music.train.complete import _Decoder, _run_graph, fast_step_for, prefill  # noqa: E402
from rwkv_music.train.sampling import SamplingConfig, draw_uniforms  # noqa: E402

DEMO_PROMPT = REPO / "examples" / "demo-corpus" / "POP909_010.mid"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, n: int) -> float:
    """Mean ms per call of fn over n calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def make_model(preset: str, vocab: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> RWKV7:
    torch.manual_seed(seed)
    cfg = from_preset(preset, vocab) if preset != "issue" else RWKV7Config(vocab_size=vocab, n_layer=12, n_embd=768)
    return RWKV7(cfg).eval().to(device=device, dtype=dtype)


def _capture(fn, device: torch.device):
    """fn captured as a CUDA graph (warmed up on a side stream first, as torch.cuda.graph requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    sync(device)
    return g


@torch.no_grad()
def bench_prefill(model: RWKV7, T: int, repeats: int, graph: bool = False, compiled: bool = False,
                  fused: bool = False) -> float:
    """One prefill of T tokens. `fused`: what `complete` runs (the fused kernels, from a token list); else the
    readable forward, `graph`/`compiled` as a CUDA graph / torch.compile'd (how much of the eager time is launch
    overhead)."""
    device = model.device
    idx = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    last = torch.tensor([T - 1], device=device)
    if fused:
        fast, tokens = FastStep.for_model(model), idx[0].tolist()
        for _ in range(2):
            prefill(model, tokens, device, fast)
        return statistics.median([timed(lambda: prefill(model, tokens, device, fast), device, 1)
                                  for _ in range(repeats)])
    if compiled:
        torch._dynamo.reset()
    fwd = torch.compile(model, dynamic=False) if compiled else model

    def run():
        return fwd(idx, positions=last, return_state=True)

    for _ in range(2):
        run()
    fn = _capture(run, device).replay if graph else run
    times = [timed(fn, device, 1) for _ in range(repeats)]
    return statistics.median(times)


@torch.no_grad()
def profile_prefill(model: RWKV7, T: int, top: int) -> None:
    """Print where one prefill's time goes (top ops by self device time, 3 prefills), for the readable forward
    and (CUDA) the fused prefill, with the device time per prefill."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = model.device
    cuda = device.type == "cuda"
    idx = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    last = torch.tensor([T - 1], device=device)
    fast = FastStep.for_model(model) if cuda else None
    runs = {"readable": lambda: model(idx, positions=last, return_state=True)}
    if fast is not None:
        runs["fused"] = lambda: fast.prefill(idx)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name, fn in runs.items():
        fn()
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(3):
                fn()
            sync(device)
        events = prof.key_averages()
        # kernels only (an op's row repeats the time of the kernels it launched)
        dev_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) if cuda else (
            float("nan"))
        print(f"# profile ({name}): 3 prefills of {T} tokens, device time per prefill {dev_us / 3e3:.3f} ms, "
              f"sorted by {key}")
        print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))


@torch.no_grad()
def profile_step(model: RWKV7, B: int, top: int, tensor_cores: bool = True) -> None:
    """Print where the fused decode step's device time goes at B rows (each kernel's mean time per step over 20
    eager steps, which launch the same kernels as the CUDA graph `complete` replays)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = model.device
    _, state = model(torch.randint(0, model.cfg.vocab_size, (B, 16), device=device), return_state=True)
    tok = torch.zeros(B, dtype=torch.long, device=device)
    fast = FastStep(model, tensor_cores=tensor_cores)
    for _ in range(3):
        fast(tok, state)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fast(tok, state)
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / 20
    tag = ", tensor-core products" if fast.tensor_cores else ", CUDA-core products"
    print(f"# profile (fused step{tag}, {B} rows): device time per step {total / 1e3:.3f} ms")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"#   {e.self_device_time_total / 20:9.1f} us/step  {e.count // 20:4d} launches/step  {e.key[:100]}")


@torch.no_grad()
def bench_step(model: RWKV7, B: int, steps: int, graph: bool, compiled: bool = False, fused: bool = False,
               tensor_cores: bool = True) -> float:
    device = model.device
    _, state = model(torch.randint(0, model.cfg.vocab_size, (B, 16), device=device), return_state=True)
    tok = torch.zeros(B, dtype=torch.long, device=device)
    if compiled:
        torch._dynamo.reset()  # a fresh compile per shape (no cache-size limit, no dynamic-shape fallback)
    model_step = torch.compile(model.step, dynamic=False) if compiled else model.step
    fast = FastStep(model, tensor_cores=tensor_cores) if fused else None

    def step():
        if fast is not None:
            return fast(tok, state)  # updates the state in place
        logits, new = model_step(tok, state)
        state.copy_(new)
        return logits

    if not graph:
        for _ in range(3):
            step()
        return timed(step, device, steps)
    return timed(_capture(step, device).replay, device, steps)


@torch.no_grad()
def bench_generate(model: RWKV7, B: int, steps: int, graph: bool, compiled: bool = False,
                   fused: bool = False) -> float:
    """The real decode step of `complete` (grammar + sampling + model); a large bar target and budget. (The
    step's work is the same whatever the samples do: finished ones keep running on PAD.)"""
    device = model.device
    if compiled:
        torch._dynamo.reset()
    tok = build_tokenizer()
    grammar = RemiGrammar(tok)
    ids = encode_piano(load_piano_score(DEMO_PROMPT, tok), tok)
    w = build_prompt(ids, Vocab(tok), 4, 2048)
    start = grammar.run(w.tokens, w.meta_len)
    budget = 16 * steps + 100
    logits, state = prefill(model, w.tokens, device)
    bg = BatchedGrammar(grammar, start, B, bars=budget // 8, max_new_tokens=budget, device=device)
    u = draw_uniforms(list(range(B)), budget, device)
    dec = _Decoder(model, bg, logits.expand(B, -1), state.expand(B), u, SamplingConfig(), grammar.vocab_size,
                   grammar.pad_id, compiled, fast_step_for(model) if fused else None)
    if not graph:
        for _ in range(3):
            dec.step()
        return timed(dec.step, device, steps)
    _run_graph(dec, 4, 1)  # warm-up + capture path of `complete`, then time replays of our own capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dec.step()
    g.replay()
    return timed(g.replay, device, steps)


PIP_SCRIPT = r"""
import os, sys, json, time, statistics
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = sys.argv[3]
import torch
from rwkv.model import RWKV
path, strategy, _, T, steps, repeats, vocab = sys.argv[1:8]
T, steps, repeats, vocab = int(T), int(steps), int(repeats), int(vocab)
cuda = strategy.startswith("cuda")
def sync():
    if cuda: torch.cuda.synchronize()
m = RWKV(model=path, strategy=strategy)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (T,), generator=g).tolist()
for _ in range(2): m.forward(ids, None)
times = []
for _ in range(repeats):
    sync(); t0 = time.perf_counter(); m.forward(ids, None); sync(); times.append((time.perf_counter() - t0) * 1e3)
_, state = m.forward(ids[:16], None)
for _ in range(3): _, state = m.forward([1], state)
sync(); t0 = time.perf_counter()
for _ in range(steps): _, state = m.forward([1], state)
sync()
print(json.dumps({"prefill_ms": statistics.median(times), "step_ms": (time.perf_counter() - t0) / steps * 1e3}))
"""


def bench_rwkv_pip(model: RWKV7, device: torch.device, strategy: str, T: int, steps: int, repeats: int) -> dict:
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return {"error": "rwkv package not installed"}
    with tempfile.TemporaryDirectory() as d:
        pth = Path(d) / "model.pth"
        save_rwkv_lm(model.float().cpu(), pth)
        proc = subprocess.run([sys.executable, "-c", PIP_SCRIPT, str(pth)[:-4], strategy,
                               "1" if device.type == "cuda" else "0", str(T), str(steps), str(repeats),
                               str(model.cfg.vocab_size)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["strategy"] = strategy
    return out


def check(device: torch.device, dtype: torch.dtype, vocab: int) -> None:
    """Same tokens with and without the CUDA graph, batched vs single, and (in float32) the fused prefill and step
    vs the readable ones, on a random model (tiny preset)."""
    from rwkv_music.train.complete import CompleteConfig, complete

    tok = build_tokenizer()
    cfg = dict(bars=2, seed=3, context_bars=4)
    if device.type == "cuda":
        m32 = make_model("tiny", max(vocab, len(tok.vocab)), device, torch.float32)
        runs = [complete(m32, tok, DEMO_PROMPT, CompleteConfig(num_samples=4, fast_step=f, **cfg)) for f in (1, 0)]
        same_f = [a.tokens == b.tokens for a, b in zip(*(r.samples for r in runs), strict=True)]
        print(f"# check on {device}: float32, fused prefill + step == readable per sample {same_f}")
    model = make_model("tiny", max(vocab, len(tok.vocab)), device, dtype)
    graph = complete(model, tok, DEMO_PROMPT, CompleteConfig(num_samples=4, cuda_graph=True, **cfg))
    eager = complete(model, tok, DEMO_PROMPT, CompleteConfig(num_samples=4, cuda_graph=False, **cfg))
    singles = [complete(model, tok, DEMO_PROMPT, CompleteConfig(num_samples=1, cuda_graph=True,
                                                                **{**cfg, "seed": 3 + k})).samples[0]
               for k in range(4)]
    torch._dynamo.reset()
    compiled = complete(model, tok, DEMO_PROMPT, CompleteConfig(num_samples=4, cuda_graph=True, compile_step=True,
                                                                fast_step=False, **cfg))
    # the compiled step is the readable one: compare it with the readable step, eager
    readable = complete(model, tok, DEMO_PROMPT, CompleteConfig(num_samples=4, cuda_graph=False, fast_step=False,
                                                                **cfg))
    same_c = [a.tokens == b.tokens for a, b in zip(compiled.samples, readable.samples, strict=True)]
    same = [a.tokens == b.tokens for a, b in zip(graph.samples, eager.samples, strict=True)]
    batched = [a.tokens == b.tokens for a, b in zip(graph.samples, singles, strict=True)]
    print(f"# check on {device}: graph == eager per sample {same}; compiled graph == readable eager {same_c}; "
          f"batch-of-4 == single runs {batched}; "
          f"bars {[s.bars for s in graph.samples]}, tokens {[len(s.tokens) for s in graph.samples]}, "
          f"notes {[s.continuation.note_num() for s in graph.samples]}")


def add(rows: list[dict], row: dict) -> None:
    """Keep the row for the table and print it now, so a run cut short by its time limit still reports."""
    rows.append(row)
    print("# row " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--presets", nargs="+", default=None,
                    help="Model shapes: 'issue' (L12 D768) or project presets [cuda: issue; cpu: tiny small].")
    ap.add_argument("--vocab", type=int, default=640)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="Ours [cuda: bfloat16, cpu: float32].")
    ap.add_argument("--pip-strategy", default=None, help="The rwkv package's strategy [cuda fp16 | cpu fp32].")
    ap.add_argument("--compile", action="store_true", help="Add rows with the readable step torch.compile'd.")
    ap.add_argument("--readable-eager", action="store_true",
                    help="CUDA: add rows of the readable step without a CUDA graph (~20 ms a step).")
    ap.add_argument("--check", action="store_true",
                    help="First check on a real prompt that CUDA-graph decoding gives the same tokens as eager "
                         "decoding, and a batch of 4 the same as 4 single runs.")
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 128], help="Prefill lengths [1024 128].")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=None, help="Decode steps timed [cuda 500, cpu 50].")
    ap.add_argument("--repeats", type=int, default=None, help="Prefill repeats [cuda 20, cpu 3].")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch default].")
    ap.add_argument("--no-rwkv-pip", action="store_true", help="Skip the rwkv package.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    ap.add_argument("--profile-prefill", action="store_true", help="Print where the prefill's time goes.")
    ap.add_argument("--profile-step", action="store_true",
                    help="Print where the fused decode step's time goes at each of --batches (CUDA).")
    ap.add_argument("--cuda-core-products", action="store_true",
                    help="CUDA, bf16, sm_80 or later: also time (and with --profile-step profile) the fused step "
                         "with its matrix products on the CUDA cores, beside the default tensor-core form.")
    ap.add_argument("--prefill-wkv-configs", action="store_true",
                    help="CUDA: time the fused prefill with each built WKV forward configuration.")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    presets = args.presets or (["issue"] if cuda else ["tiny", "small"])
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    strategy = args.pip_strategy or ("cuda fp16" if cuda else "cpu fp32")
    steps = args.steps or (500 if cuda else 50)
    repeats = args.repeats or (20 if cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_core_products and not (cuda and dtype == "bfloat16"
                                        and torch.cuda.get_device_capability(device)[0] >= 8):
        ap.error("--cuda-core-products needs bfloat16 on a CUDA GPU of sm_80 or later (elsewhere the products are on "
                 "the CUDA cores anyway)")
    env = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "dtype": dtype, "wkv": os.environ.get("RWKV_MUSIC_WKV", "auto")}
    print("# " + ", ".join(f"{k}: {v}" for k, v in env.items()))
    if args.check:
        check(device, DTYPES[dtype], args.vocab)
    rows = []
    for preset in presets:
        model = make_model(preset, args.vocab, device, DTYPES[dtype])
        shape = f"{preset} L{model.cfg.n_layer} D{model.cfg.n_embd} V{args.vocab}"
        for T in args.prefill:
            # (graph, compiled, fused); the first CUDA row is what `complete` runs with no flags
            for graph, compiled, fused in ([(False, False, True)] if cuda else []) + [(False, False, False)] + (
                    [(True, False, False)] if cuda else []) + ([(cuda, True, False)] if args.compile else []):
                tag = "fused" if fused else ("readable " + ("compiled " if compiled else "") + (
                    "graph" if graph else "eager"))
                add(rows, {"impl": "ours", "shape": shape, "what": f"prefill {T} ({tag})", "batch": 1,
                             "tokens": T, "ms": bench_prefill(model, T, repeats, graph, compiled, fused)})
        if args.profile_prefill:
            profile_prefill(model, args.prefill[0], 25)
        if cuda and args.prefill_wkv_configs:
            fast = FastStep.for_model(model)
            idx = torch.randint(0, model.cfg.vocab_size, (1, args.prefill[0]), device=device)
            for c in range(3):  # the forward configurations always built (wkv_cuda.DEFAULT_CONFIGS)
                fast.prefill(idx, wkv_config=c)
                ms = statistics.median([timed(lambda f=fast, i=idx, c=c: f.prefill(i, wkv_config=c), device, 1)
                                        for _ in range(repeats)])
                add(rows, {"impl": "ours", "shape": shape, "what": f"prefill {args.prefill[0]} (fused, wkv fwd {c})",
                           "batch": 1, "tokens": args.prefill[0], "ms": ms})
        for B in args.batches if cuda and args.profile_step else []:
            for tensor_cores in [True, False] if args.cuda_core_products else [True]:
                profile_step(model, B, 12, tensor_cores=tensor_cores)
        for B in args.batches:
            # (graph, compiled, fused); the first CUDA row is what `complete` runs with no flags
            if cuda:
                modes = [(True, False, True), (False, False, True), (True, False, False)]
            else:
                modes = [(False, False, False)]
            if args.readable_eager and cuda:
                modes.append((False, False, False))
            if args.compile:
                modes.append((cuda, True, False))
            for graph, compiled, fused in modes:
                tag = ("fused " if fused else "readable ") + ("compiled " if compiled else "") + (
                    "graph" if graph else "eager")
                add(rows, {"impl": "ours", "shape": shape, "what": f"step ({tag})", "batch": B,
                             "ms": bench_step(model, B, steps, graph, compiled, fused)})
                add(rows, {"impl": "ours", "shape": shape, "what": f"generate ({tag})", "batch": B,
                             "ms": bench_generate(model, B, steps, graph, compiled, fused)})
            if cuda and args.cuda_core_products:
                add(rows, {"impl": "ours", "shape": shape, "what": "step (fused graph, CUDA-core products)",
                           "batch": B, "ms": bench_step(model, B, steps, True, fused=True, tensor_cores=False)})
        if not args.no_rwkv_pip:
            pip = bench_rwkv_pip(model, device, strategy, args.prefill[0], steps, repeats)
            if "error" in pip:
                add(rows, {"impl": "rwkv-pip", "shape": shape, "what": "error", "batch": 1, "ms": float("nan"),
                             "note": pip["error"]})
            else:
                add(rows, {"impl": "rwkv-pip", "shape": shape, "what": f"prefill {args.prefill[0]}", "batch": 1,
                             "tokens": args.prefill[0], "ms": pip["prefill_ms"], "note": pip["strategy"]})
                add(rows, {"impl": "rwkv-pip", "shape": shape, "what": "step", "batch": 1, "ms": pip["step_ms"],
                             "note": pip["strategy"]})
        del model
    print(f"{'impl':<9} {'shape':<22} {'what':<34} {'batch':>5} {'ms':>9} {'tok/s':>9}  note")
    for r in rows:
        tps = "" if r["what"].startswith(("prefill", "error")) else f"{r['batch'] * 1e3 / r['ms']:9.0f}"
        if r["what"].startswith("prefill"):
            tps = f"{r['tokens'] * 1e3 / r['ms']:9.0f}"
        print(f"{r['impl']:<9} {r['shape']:<22} {r['what']:<34} {r['batch']:>5} {r['ms']:9.3f} {tps:>9}  "
              f"{r.get('note', '')}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
