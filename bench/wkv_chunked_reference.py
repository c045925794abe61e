"""The chunked WKV7 algebra of `bench/wkv_chunked_triton.py` and its hand-written backward, in plain PyTorch.

The readable form of what the Triton kernels compute, chunk by chunk (no resets): the derivation the backward
kernel follows, checked against autograd through the float64 recurrence. The package's own chunked WKV
(`rwkv_music.model.wkv._wkv_chunked`) is the same algebra in another factorisation (a triangular solve, exponents
centred in the chunk) and leaves the backward to autograd; this one keeps the kernels' terms (W_a, Z, R', A, D)
so that their gradients and their product precision can be checked term for term. `--products tf32` rounds both operands
of every matrix product to tf32's 10 mantissa bits (accumulating in fp32, as tensor cores do) and `tf32x3`
splits each operand in a high and a low tf32 part, to estimate on a CPU how far each product precision moves the
outputs and gradients.

    python bench/wkv_chunked_reference.py                       # float64: must match autograd to ~1e-15
    python bench/wkv_chunked_reference.py --dtype float32 --products fp32 tf32 tf32x3 --chunk 16 64
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_music.model.wkv import wkv_reference

DECAY_SCALE = math.exp(-0.5)


def _tf32(x: Tensor) -> Tensor:
    """x (float32) rounded to the nearest tf32 value (10 explicit mantissa bits; ties away from zero, as PTX's
    cvt.rna.tf32.f32)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_trunc(x: Tensor) -> Tensor:
    """x (float32) with its low 13 mantissa bits dropped: what the tensor cores read from an fp32 register that was
    not rounded first (Triton's tf32 dot passes fp32 operands as they are, triton-lang/triton#4574)."""
    i = x.contiguous().view(torch.int32)
    return (i & ~0x1FFF).view(torch.float32)


class Products:
    """Matrix products at a chosen precision: fp32 (or float64) as given, tf32 (operands rounded to nearest),
    tf32trunc (operands truncated), or tf32x3."""

    def __init__(self, kind: str = "fp32"):
        self.kind = kind

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self.kind == "fp32" or a.dtype == torch.float64:
            return a @ b
        if self.kind == "tf32trunc":
            return _tf32_trunc(a) @ _tf32_trunc(b)
        ah, bh = _tf32(a), _tf32(b)
        if self.kind == "tf32":
            return ah @ bh
        return ah @ bh + ah @ _tf32(b - bh) + _tf32(a - ah) @ bh


def _tril(x: Tensor, strict: bool) -> Tensor:
    L = x.shape[-1]
    return x * torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def chunk_terms(r, w, k, v, a, b, mm: Products) -> dict[str, Tensor]:
    """Everything of a chunk that does not depend on its initial state S_c (inputs [..., L, N]): with
    U = W_a S_c^T + Z,  Y = R' S_c^T + Y0  and  S_{c+1}^T = A S_c^T + D."""
    logd = -DECAY_SCALE * torch.sigmoid(w)
    G = logd.cumsum(-2)
    gl = G[..., -1:, :]
    gx = G - logd
    ahat, rhat = a * gx.exp(), r * G.exp()
    btil, ktil = b * (-G).exp(), k * (-G).exp()
    bl, kl = b * (gl - G).exp(), k * (gl - G).exp()
    m_ab, m_ak = _tril(mm(ahat, _t(btil)), True), _tril(mm(ahat, _t(ktil)), True)
    q_rb, q_rk = _tril(mm(rhat, _t(btil)), False), _tril(mm(rhat, _t(ktil)), False)
    L = r.shape[-2]
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    inv, p = eye + m_ab, m_ab  # (I - M)^-1 = (I + M)(I + M^2)(I + M^4)...: M is nilpotent
    for _ in range(L.bit_length() - 2):
        p = mm(p, p)
        inv = mm(inv, eye + p)
    wa, x = mm(inv, ahat), mm(m_ak, v)
    z = mm(inv, x)
    return dict(G=G, gl=gl, gx=gx, ahat=ahat, rhat=rhat, btil=btil, ktil=ktil, bl=bl, kl=kl, m_ak=m_ak,
                q_rb=q_rb, q_rk=q_rk, inv=inv, wa=wa, x=x, z=z,
                y0=mm(q_rb, z) + mm(q_rk, v), rp=rhat + mm(q_rb, wa),
                A=torch.diag_embed(gl.squeeze(-2).exp()) + mm(_t(bl), wa), D=mm(_t(bl), z) + mm(_t(kl), v))


def forward(r, w, k, v, a, b, s0, L: int, mm: Products):
    """Inputs [BH, T, N] with T % L == 0, s0 [BH, N (value), N (key)]: y, the final state, the chunk terms, and
    the state at each chunk's start (as S^T, [BH, NC, key, value])."""
    BH, T, N = r.shape
    c = chunk_terms(*(x.reshape(BH, T // L, L, N) for x in (r, w, k, v, a, b)), mm)
    ST, starts = _t(s0), []
    for i in range(T // L):
        starts.append(ST)
        ST = mm(c["A"][:, i], ST) + c["D"][:, i]
    S = torch.stack(starts, 1)
    return (mm(c["rp"], S) + c["y0"]).reshape(BH, T, N), _t(ST), c, S


def backward(r, w, k, v, a, b, s0, L: int, dy: Tensor, dsT: Tensor, mm: Products, form_da: bool = False):
    """Gradients of <y, dy> + <sT, dsT> w.r.t. r, w, k, v, a, b and s0, by the chain rule through `forward`."""
    BH, T, N = r.shape
    NC = T // L
    _, _, c, S = forward(r, w, k, v, a, b, s0, L, mm)
    v_ = v.reshape(BH, NC, L, N)
    w_ = w.reshape(BH, NC, L, N)
    dy = dy.reshape(BH, NC, L, N)
    dST, d_next = _t(dsT), [None] * NC  # reverse scan: dS_c^T = R'_c^T dY_c + A_c^T dS_{c+1}^T
    for i in reversed(range(NC)):
        d_next[i] = dST
        dST = mm(_t(c["rp"][:, i]), dy[:, i]) + mm(_t(c["A"][:, i]), dST)
    dD = torch.stack(d_next, 1)
    d_rp = mm(dy, _t(S))
    wa, z, x, inv, q_rb, q_rk, m_ak = (c[n] for n in ("wa", "z", "x", "inv", "q_rb", "q_rk", "m_ak"))
    ahat, rhat, btil, ktil, bl, kl = (c[n] for n in ("ahat", "rhat", "btil", "ktil", "bl", "kl"))
    d_qrb = _tril(mm(dy, _t(z)) + mm(d_rp, _t(wa)), False)
    d_qrk = _tril(mm(dy, _t(v_)), False)
    bl_dD = mm(bl, dD)
    dz = mm(_t(q_rb), dy) + bl_dD
    if form_da:  # dA = dS_next S^T formed, as the kernel did before 2026-12-07
        dA = mm(dD, _t(S))
        dwa = mm(_t(q_rb), d_rp) + mm(bl, dA)
        dbl = mm(wa, _t(dA)) + mm(z, _t(dD))
        diag_dA = torch.diagonal(dA, dim1=-2, dim2=-1)
    else:  # the kernel's form: (bl dD) S^T, U dD^T with U = W_a S^T + Z, and the diagonal as row sums
        dwa = mm(_t(q_rb), d_rp) + mm(bl_dD, _t(S))
        dbl = mm(mm(wa, S) + z, _t(dD))
        diag_dA = (dD * S).sum(-1)
    dkl = mm(v_, _t(dD))
    dgl = diag_dA * c["gl"].squeeze(-2).exp() + (dbl * bl + dkl * kl).sum(-2)
    dx = mm(_t(inv), dz)
    dv = mm(_t(q_rk), dy) + mm(kl, dD) + mm(_t(m_ak), dx)
    dinv = mm(dwa, _t(ahat)) + mm(dz, _t(x))
    dm_ab = _tril(mm(mm(_t(inv), dinv), _t(inv)), True)
    dm_ak = _tril(mm(dx, _t(v_)), True)
    dahat = mm(_t(inv), dwa) + mm(dm_ab, btil) + mm(dm_ak, ktil)
    dbtil = mm(_t(dm_ab), ahat) + mm(_t(d_qrb), rhat)
    dktil = mm(_t(dm_ak), ahat) + mm(_t(d_qrk), rhat)
    drhat = d_rp + mm(d_qrb, btil) + mm(d_qrk, ktil)
    G, gx, gl = c["G"], c["gx"], c["gl"]
    dG = drhat * rhat - dbtil * btil - dktil * ktil - dbl * bl - dkl * kl
    d_gx = dahat * ahat
    suffix = dG.flip(-2).cumsum(-2).flip(-2)  # G = cumsum(log d): sum over s >= t
    strict_suffix = d_gx.flip(-2).cumsum(-2).flip(-2) - d_gx  # G - log d: sum over s > t
    # sigmoid(w) sigmoid(-w), not s (1 - s): that is 0 in fp32 at w >= 17, where the float64 gradient is not
    dw = (suffix + strict_suffix + dgl[..., None, :]) * (-DECAY_SCALE) * torch.sigmoid(w_) * torch.sigmoid(-w_)
    grads = (drhat * G.exp(), dw, dktil * (-G).exp() + dkl * (gl - G).exp(), dv, dahat * gx.exp(),
             dbtil * (-G).exp() + dbl * (gl - G).exp())
    return [g.reshape(BH, T, N) for g in grads], _t(dST)


def _rel(x: Tensor, ref: Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--products", nargs="+", default=["fp32"], choices=["fp32", "tf32", "tf32trunc", "tf32x3"],
                    help="tf32: operands rounded to nearest (the kernels' RWKV_MUSIC_WKV_PRECISION=tf32rn); tf32trunc: "
                         "operands truncated (the kernels' tf32, what the tensor cores do with unrounded fp32).")
    ap.add_argument("--chunk", type=int, nargs="+", default=[16])
    ap.add_argument("--heads", type=int, default=4, help="B*H")
    ap.add_argument("--seq", type=int, default=256, help="T (a multiple of every --chunk)")
    ap.add_argument("--w-scale", type=float, default=3.0, help="Spread of the raw decay logits (30: both ends).")
    ap.add_argument("--w-const", type=float, default=None, help="Every raw decay logit this value (30: decay 0.545).")
    ap.add_argument("--form-da", action="store_true",
                    help="Backward with dA = dS_next S^T formed (the kernel before 2026-12-07), to compare rounding.")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    BH, T, N = args.heads, args.seq, 64
    r, k, v = (torch.randn(BH, T, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(BH, T, N, generator=g, dtype=torch.float64) * args.w_scale
    if args.w_const is not None:
        w = torch.full_like(w, args.w_const)
    kk = torch.nn.functional.normalize(torch.randn(BH, T, N, generator=g, dtype=torch.float64), dim=-1)
    rate = torch.sigmoid(torch.randn(BH, T, N, generator=g, dtype=torch.float64))
    inputs = [r, w, k * 0.5, v, -kk, kk * rate, torch.randn(BH, N, N, generator=g, dtype=torch.float64) * 0.3]
    ref_in = [x.clone().requires_grad_() for x in inputs]
    y_ref, s_ref = wkv_reference(*(x[:, :, None] for x in ref_in[:6]), state=ref_in[6][:, None])
    dy, dsT = torch.randn(y_ref.shape, generator=g, dtype=torch.float64), torch.randn(s_ref.shape, generator=g,
                                                                                     dtype=torch.float64)
    want = torch.autograd.grad((y_ref * dy).sum() + (s_ref * dsT).sum(), ref_in)
    xs = [x.to(dt) for x in inputs]
    for L in args.chunk:
        for kind in args.products:
            mm = Products(kind)
            y, sT, _, _ = forward(*xs, L, mm)
            grads, ds0 = backward(*xs, L, dy[:, :, 0].to(dt), dsT[:, 0].to(dt), mm, args.form_da)
            errs = [_rel(y, y_ref[:, :, 0]), _rel(sT, s_ref[:, 0])]
            errs += [_rel(mine, ref.reshape(mine.shape)) for mine, ref in zip([*grads, ds0], want, strict=True)]
            names = ["y", "sT", "dr", "dw", "dk", "dv", "da", "db", "ds0"]
            print(f"{args.dtype} L{L} {kind:7s} " + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs, strict=True)))


if __name__ == "__main__":
    main()
