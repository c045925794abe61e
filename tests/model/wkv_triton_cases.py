"""The Triton WKV backend against the float64 reference and against the PyTorch model, run under
TRITON_INTERPRET=1 (test_wkv_triton_interpreter.py starts it in a subprocess, as the interpreter must be chosen
before triton is imported). Prints one JSON object: every case's relative L2 errors."""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl
from model_testutil import randomised_model, rel_err, wkv_inputs

from rwkv_music.model import RWKV7Config
from rwkv_music.model.wkv import resolve_backend, wkv, wkv_reference
from rwkv_music.model.wkv_chunk_kernels import _tf32_round

NAMES = ("y", "state", "r", "w", "k", "v", "a", "b", "s0")


def wkv_case(T: int, with_state: bool, resets: bool, w_scale: float, bv: int | None, seed: int, B: int = 2,
             H: int = 2) -> dict:
    """Outputs and every gradient of the triton backend (through `wkv`, or `wkv_triton` itself with a row tile
    `bv`) against autograd through the float64 loop."""
    from rwkv_music.model.wkv_triton import wkv_triton

    g = torch.Generator().manual_seed(seed)
    xs = wkv_inputs(B, T, H, 64, torch.float32, seed=seed)
    xs[1] = xs[1] * w_scale
    s0 = torch.randn(B, H, 64, 64, generator=g) * 0.3
    starts = None
    if resets:
        starts = torch.rand(B, T, generator=g) < 0.15
        starts[0, ::16] = True  # resets at chunk starts too
        starts[-1, :3] = False  # the initial state reaches into the last row
    dy, ds = torch.randn(B, T, H, 64, generator=g), torch.randn(B, H, 64, 64, generator=g)
    ins = [x.clone().requires_grad_() for x in xs] + ([s0.clone().requires_grad_()] if with_state else [])
    if bv is None:
        y, sT = wkv(*ins[:6], ins[6] if with_state else None, starts=starts,
                    backend=resolve_backend("triton", torch.device("cpu")))
    else:
        y, sT = wkv_triton(*ins[:6], ins[6] if with_state else None, starts=starts, bv=bv)
    got = [y, sT, *torch.autograd.grad((y * dy).sum() + (sT * ds).sum(), ins)]
    ref_in = [x.double().requires_grad_() for x in xs] + ([s0.double().requires_grad_()] if with_state else [])
    y_ref, s_ref = wkv_reference(*ref_in[:6], ref_in[6] if with_state else None, starts=starts)
    want = [y_ref, s_ref, *torch.autograd.grad((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum(), ref_in)]
    return {n: rel_err(a, b) for n, a, b in zip(NAMES, got, want, strict=False)}


def recompute_case() -> dict:
    """RWKV_MUSIC_WKV_RECOMPUTE=1: nothing saved but the inputs, the forward walked again in backward."""
    from rwkv_music.model.wkv_triton import recompute

    os.environ["RWKV_MUSIC_WKV_RECOMPUTE"] = "1"
    try:
        assert recompute()
        return wkv_case(37, True, True, 1.0, None, 8, B=2, H=3)
    finally:
        del os.environ["RWKV_MUSIC_WKV_RECOMPUTE"]


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, _tf32_round(tl.load(x_ptr + o, mask=o < n)), mask=o < n)


def _tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to tf32 in float64 arithmetic (an independent route from the kernels' bit trick): the
    nearest multiple of the tf32 spacing at x's exponent (2^-136 below the normal range), ties away from zero;
    past the largest tf32 value, inf. NaN and inf stay."""
    xd = x.double()
    _, e = torch.frexp(xd)
    ulp = torch.exp2(torch.clamp(e.double() - 11, min=-136.0))
    r = torch.copysign(torch.floor(xd.abs() / ulp + 0.5) * ulp, xd)  # -0 stays -0
    r = torch.where(r.abs() >= 2.0 ** 128, torch.copysign(torch.full_like(xd, torch.inf), xd), r)
    return torch.where(torch.isfinite(xd), r, xd).float()


def rounding_case() -> dict:
    """The kernels' `_tf32_round` on every kind of fp32 bit pattern: random ones, both signs, subnormals, ties,
    the largest finite values, inf, and NaNs (the GPU's 0x7FFFFFFF among them)."""
    g = torch.Generator().manual_seed(0)
    special = [0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, 0x7F800000, -0x800000, 0, -0x80000000, 0x7F7FFFFF,
               0x7F7FF000, 0x7F7FEFFF, 0x3F801000, -0x407FF000, 0x3F800FFF, 0x00000001, 0x00001000, 0x00002FFF,
               -0x7FFFE000]
    bits = torch.cat([torch.tensor(special, dtype=torch.int32),
                      torch.randint(-2**31, 2**31, (20000,), generator=g, dtype=torch.int64).to(torch.int32)])
    x = bits.view(torch.float32)
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = _tf32_reference(x)
    nan = torch.isnan(x)
    same = (y.view(torch.int32) == want.view(torch.int32)) | (nan & torch.isnan(y))
    return {"values": x.numel(), "mismatches": int((~same).sum()), "nans": int(nan.sum()),
            "nans_kept": bool(torch.isnan(y[nan]).all())}


def model_case() -> dict:
    """A small model on the triton backend against the same model on the chunked PyTorch WKV: logits of packed
    rows and every parameter's gradient, eager and compiled (the aot_eager backend: inductor's kernels are for a
    GPU); and how many graphs dynamo makes of the model on each backend (the custom ops must not break it)."""
    cfg = RWKV7Config(vocab_size=61, n_layer=2, n_embd=128, head_size=64)
    out = {}
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 61, (2, 21), generator=g)
    starts = torch.zeros(2, 21, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 9] = True  # two windows packed into row 0
    for name in ("torch", "triton", "triton compiled"):
        model = randomised_model(cfg, seed=1).train()
        model.wkv_backend = name.split()[0]
        fwd = torch.compile(model, backend="aot_eager") if "compiled" in name else model
        logits = fwd(idx, starts=starts)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), idx.roll(-1, 1).reshape(-1))
        loss.backward()
        out[name] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    l0, g0 = out["torch"]
    res = {}
    for name in ("triton", "triton compiled"):
        l1, g1 = out[name]
        res[name] = {"logits": rel_err(l1, l0),
                     "worst_grad": max(rel_err(a, b) for a, b in zip(g1, g0, strict=True) if b.norm() > 0)}
    for name in ("torch", "triton"):
        model = randomised_model(cfg, seed=1)
        model.wkv_backend = name
        res[f"graphs {name}"] = torch._dynamo.explain(model)(idx, starts=starts).graph_count
    return res


def main() -> None:
    """argv: the products' precision [ieee], then the names of the cases to run [all]."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    os.environ["RWKV_MUSIC_WKV_PRECISION"] = sys.argv[1] if len(sys.argv) > 1 else "ieee"
    cases = {
        "T1": lambda: wkv_case(1, True, False, 1.0, 16, 1),
        "T16 state B1 H3": lambda: wkv_case(16, True, False, 1.0, None, 2, B=1, H=3),
        "T21 state resets B3 H1": lambda: wkv_case(21, True, True, 1.0, None, 6, B=3, H=1),
        "T37 no state bv64": lambda: wkv_case(37, False, False, 1.0, 64, 3),
        "T37 state resets bv32": lambda: wkv_case(37, True, True, 1.0, 32, 4),
        "T33 extreme decays": lambda: wkv_case(33, True, False, 15.0, None, 5),
        "T37 state resets recompute": recompute_case,
        "model": model_case,
        "rounding": rounding_case,
    }
    names = sys.argv[2:] or list(cases)
    print(json.dumps({name: cases[name]() for name in names}))

if __name__ == "__main__":
    main()
