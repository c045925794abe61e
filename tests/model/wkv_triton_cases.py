"""The Triton WKV backend against the float64 reference and against the PyTorch model, run under
TRITON_INTERPRET=1 (test_wkv_triton_interpreter.py starts it in a subprocess, as the interpreter must be chosen
before triton is imported). Prints one JSON object: every case's relative L2 errors."""

from __future__ import annotations

import json
import os
import sys

import torch
from model_testutil import randomised_model, rel_err, wkv_inputs

from rwkv_music.model import RWKV7Config
from rwkv_music.model.wkv import resolve_backend, wkv, wkv_reference

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
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    os.environ["RWKV_MUSIC_WKV_PRECISION"] = sys.argv[1] if len(sys.argv) > 1 else "ieee"
    cases = {
        "T1": wkv_case(1, True, False, 1.0, 16, 1),
        "T16 state B1 H3": wkv_case(16, True, False, 1.0, None, 2, B=1, H=3),
        "T21 state resets B3 H1": wkv_case(21, True, True, 1.0, None, 6, B=3, H=1),
        "T37 no state bv64": wkv_case(37, False, False, 1.0, 64, 3),
        "T37 state resets bv32": wkv_case(37, True, True, 1.0, 32, 4),
        "T33 extreme decays": wkv_case(33, True, False, 15.0, None, 5),
        "T37 state resets recompute": recompute_case(),
        "model": model_case(),
    }
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
