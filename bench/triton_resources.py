"""Registers and spills of the chunked Triton WKV kernels for Hopper, without a GPU: each kernel compiled ahead of
time for sm_90 (`triton.compile` with a `GPUTarget`), then the cubin's resource usage from triton's bundled
cuobjdump. STACK is local memory per thread: the spills. Uses triton's compiler internals (3.9.0), so a newer
triton may need changes here.

    python bench/triton_resources.py [--chunks 16 32 64] [--precisions tf32rn tf32 tf32x3 ieee] [--warps 4 8] [--bv 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wkv_chunked_triton as m  # the three-pass prototype's kernels (and sys.path for the package)

from rwkv_music.model import wkv_chunk_kernels as kern  # the backend's

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
BF, F32 = "*bf16", "*fp32"
SEQ = {n: BF for n in ("r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr")}


def usage(fn, signature: dict, constexprs: dict, warps: int, maxnreg: int | None = None) -> str:
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    options = {"num_warps": warps} | ({"maxnreg": maxnreg} if maxnreg else {})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    line = next((x.strip() for x in out.stdout.splitlines() if "REG:" in x), out.stderr.strip()[-200:])
    return " ".join(line.split()[:2])  # REG:n STACK:n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--precisions", nargs="+", default=["tf32rn", "tf32", "tf32x3", "ieee"])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--bv", type=int, default=16, help="Row tile of the walking and prep kernels.")
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="Cap registers per thread (Triton's maxnreg): 128 at 8 warps lets two programs share an SM.")
    ap.add_argument("--kernels", nargs="+", default=None,
                    help="Only these (fwd_walk bwd_walk prep bwd_chunk).")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    grads = {f"d{n}_ptr": BF for n in "rwkvab"}
    for L in args.chunks:
        for prec in args.precisions:
            for warps in args.warps:
                c = dict(N=64, L=L, LOG2L=L.bit_length() - 1, PREC=prec)
                walk = {**SEQ, "st_ptr": "*u8", "s0_ptr": F32, "y_ptr": BF, "sT_ptr": F32, "S_ptr": F32, "T": "i32",
                        "NC": "i32", "H": "i32"}
                bwalk = {n: BF for n in ("r_ptr", "w_ptr", "k_ptr", "a_ptr", "b_ptr")}
                bwalk.update({"st_ptr": "*u8", "dy_ptr": BF, "dsT_ptr": F32, "dSn_ptr": F32, "ds0_ptr": F32,
                              "T": "i32", "NC": "i32", "H": "i32"})
                kernels = {
                    "fwd_walk": (kern._fwd_walk, walk, {**c, "BV": args.bv, "HAS_S0": True, "HAS_ST": True,
                                                     "SAVE": True}),
                    "bwd_walk": (kern._bwd_walk, bwalk, {**c, "BV": args.bv, "HAS_DST": True, "HAS_ST": True}),
                    "prep": (m._prep, {**SEQ, "st_ptr": "*u8", "y0_ptr": F32, "rp_ptr": F32, "A_ptr": F32,
                                       "D_ptr": F32, "T": "i32", "NC": "i32", "H": "i32"},
                             {**c, "BV": args.bv, "HAS_ST": True}),
                    "bwd_chunk": (kern._bwd_chunk, {**SEQ, "st_ptr": "*u8", "S_ptr": F32, "dSn_ptr": F32, "dy_ptr": BF,
                                                 **grads, "T": "i32", "NC": "i32", "H": "i32"}, {**c, "HAS_ST": True}),
                }
                kernels = {k: v for k, v in kernels.items() if not args.kernels or k in args.kernels}
                row = " | ".join(f"{name} {usage(fn, sig, ce, warps, args.maxnreg)}"
                                 for name, (fn, sig, ce) in kernels.items())
                cap = f", maxnreg {args.maxnreg}" if args.maxnreg else ""
                print(f"L{L} {prec:6s} {warps} warps{cap}: {row}", flush=True)


if __name__ == "__main__":
    main()
