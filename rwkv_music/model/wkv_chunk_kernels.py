"""Triton kernels of the chunked WKV7 (head size 64): the sequence walked L tokens at a time with the state in
registers, and its backward. The math is in `model/wkv_triton.py`'s docstring; the autograd wrapper there.

Imported only where triton is installed (CUDA builds of torch ship it; on the CPU it runs under
TRITON_INTERPRET=1 for the tests). Every kernel computes in fp32 whatever the input dtype; products take
`PREC` ("tf32rn": tensor cores, operands rounded to tf32 first; "tf32": tensor cores, operands truncated;
"tf32x3": three tf32 products, near fp32; "ieee": fp32 on the FMA units, for tests; `model/wkv_triton.py` gives
each one's error).
"""

import os

import triton
import triton.language as tl

# Read once at import (kernels compile it in or out): see `_dot_pre`.
_CHECK_ROUNDED = tl.constexpr(os.environ.get("RWKV_MUSIC_WKV_CHECK_ROUNDED", "") == "1")


@triton.jit
def _tf32_round(x):
    """x (fp32) rounded to the nearest tf32 value (ties away from zero, as PTX's cvt.rna.tf32.f32) by bit
    arithmetic, so that it runs the same in the interpreter. Inf and NaN are kept as they are: the GPU's NaN,
    0x7FFFFFFF, would otherwise carry into the sign bit and come out as -0."""
    i = x.to(tl.int32, bitcast=True)
    r = tl.where((i & 0x7F800000) == 0x7F800000, i, (i + 0x1000) & -0x2000)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _rnd(x, PREC: tl.constexpr):
    """x as a product takes it under PREC: rounded to tf32 for "tf32rn", else unchanged. For a tensor used only as
    a product's operand, rounding it once where it is made and passing it to `_dot_pre` gives the same bits as
    `_dot` (rounding twice changes nothing) without a rounded copy beside the original."""
    if PREC == "tf32rn":
        return _tf32_round(x)
    else:
        return x


@triton.jit
def _tf32_operand(x, DONE: tl.constexpr):
    """A "tf32rn" product's operand: rounded here, or, if DONE, taken as `_rnd` left it. An operand flagged but not
    rounded would be truncated on the GPU, which the interpreter's fp32 products cannot show: with
    RWKV_MUSIC_WKV_CHECK_ROUNDED=1 (the interpreter tests) such an operand becomes NaN instead."""
    if DONE:
        if _CHECK_ROUNDED:
            x = tl.where((x.to(tl.int32, bitcast=True) & 0x1FFF) == 0, x, float("nan"))
    else:
        x = _tf32_round(x)
    return x


@triton.jit
def _dot_pre(a, b, PREC: tl.constexpr, A_DONE: tl.constexpr, B_DONE: tl.constexpr):
    """a @ b in fp32 at the products' precision PREC, for operands of which some already went through `_rnd`
    (A_DONE, B_DONE)."""
    if PREC == "tf32rn":
        return tl.dot(_tf32_operand(a, A_DONE), _tf32_operand(b, B_DONE), input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b in fp32 at the products' precision PREC. "tf32rn" rounds both operands to tf32 first: handed fp32, the
    tensor cores drop the low 13 mantissa bits (Triton's `tl.dot` docs warn of it), and an emulation of that
    truncation matches the GPU's tf32 errors, 3-4x those the emulation of rounded operands predicts
    (bench/NOTES-wkv.md, 2026-12-07)."""
    return _dot_pre(a, b, PREC, False, False)


@triton.jit
def _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, j, valid):
    """One chunk's decay-scaled keys: a^, r^, b~, k~, and b, k scaled to the chunk's end; the chunk's log decay."""
    m2 = valid[:, None]
    full = off[:, None] + j[None, :]
    r = tl.load(r_ptr + full, mask=m2, other=0.0).to(tl.float32)
    wr = tl.load(w_ptr + full, mask=m2, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + full, mask=m2, other=0.0).to(tl.float32)
    aa = tl.load(a_ptr + full, mask=m2, other=0.0).to(tl.float32)
    bb = tl.load(b_ptr + full, mask=m2, other=0.0).to(tl.float32)
    logd = tl.where(m2, -0.6065306597126334 * tl.sigmoid(wr), 0.0)  # log d = -exp(-0.5) sigmoid(w)
    G = tl.cumsum(logd, axis=0)
    g_last = tl.sum(logd, axis=0)
    to_end = tl.exp(g_last[None, :] - G)
    return (aa * tl.exp(G - logd), r * tl.exp(G), bb * tl.exp(-G), kk * tl.exp(-G), bb * to_end, kk * to_end,
            g_last, G, logd)


@triton.jit
def _chunk_masks(st_ptr, b, T, t, valid, tt, HAS_ST: tl.constexpr):
    """Which pairs of the chunk's steps see each other (strict: s < t, incl: s <= t, within one segment between
    resets), which steps see the chunk's initial state (first), which reach its end state (last), and whether the
    initial state reaches the end (keep_end)."""
    if HAS_ST:
        seg = tl.cumsum(tl.load(st_ptr + b.to(tl.int64) * T + t, mask=valid, other=0).to(tl.int32), axis=0)
    else:
        seg = tt * 0
    same = seg[:, None] == seg[None, :]
    strict = (tt[:, None] > tt[None, :]) & same
    incl = (tt[:, None] >= tt[None, :]) & same
    seg_last = tl.max(seg, axis=0)
    return strict, incl, (seg == 0)[:, None], (seg == seg_last)[:, None], (seg_last == 0).to(tl.float32)


@triton.jit
def _chunk_products(ahat, rhat, btil, ktil, strict, incl, LOG2L: tl.constexpr, PREC: tl.constexpr):
    """The chunk's four L x L products of decay-scaled keys, masked, and (I - M_ab)^-1 by repeated squaring."""
    tt = tl.arange(0, ahat.shape[0])
    eye = (tt[:, None] == tt[None, :]).to(tl.float32)
    bt = tl.trans(btil)
    kt = tl.trans(ktil)
    m_ab = tl.where(strict, _dot(ahat, bt, PREC), 0.0)
    m_ak = tl.where(strict, _dot(ahat, kt, PREC), 0.0)
    q_rb = tl.where(incl, _dot(rhat, bt, PREC), 0.0)
    q_rk = tl.where(incl, _dot(rhat, kt, PREC), 0.0)
    inv = eye + m_ab
    p = m_ab
    for _ in tl.static_range(LOG2L - 1):
        p = _dot(p, p, PREC)
        inv = _dot(inv, eye + p, PREC)
    return m_ab, m_ak, q_rb, q_rk, inv


@triton.jit
def _walk_start(x_ptr, H, N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, HAS_X: tl.constexpr):
    """A walking program's head (bh, b, h), index vectors (steps tt, keys j, its state rows i), the head's offset
    in [B*H, N, N] tensors, and its rows of x_ptr (a state or its gradient) transposed, [N, BV] fp32, or zeros."""
    bh = tl.program_id(0)
    i = tl.program_id(1) * BV + tl.arange(0, BV)
    j = tl.arange(0, N)
    s_base = bh.to(tl.int64) * N * N
    if HAS_X:  # XT[j, i] = X[i, j]
        XT = tl.load(x_ptr + s_base + i[None, :] * N + j[:, None]).to(tl.float32)
    else:
        XT = tl.zeros((N, BV), dtype=tl.float32)
    return bh, bh // H, bh % H, tl.arange(0, L), j, i, s_base, XT


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _fwd_walk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, s0_ptr, y_ptr, sT_ptr, S_ptr, T, NC,
              H, N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, LOG2L: tl.constexpr,
              HAS_S0: tl.constexpr, HAS_ST: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr):
    """One program per head and tile of BV state rows walks the chunks, the state in registers: per chunk
    U = inv (a^0 S^T + M_ak V), Y = r^0 S^T + Q_rb U + Q_rk V, S'^T = keep e^gl S^T + bl^T U + kl^T V (the masks of
    `_chunk_masks` for resets). SAVE: the state at each chunk's start goes to S [B*H, NC, key, value] (backward)."""
    bh, b, h, tt, j, i, s_base, ST = _walk_start(s0_ptr, H, N, L, BV, HAS_S0)  # ST[j, i] = S[i, j]
    for c in range(0, NC):
        t = c * L + tt
        valid = t < T
        off = ((b.to(tl.int64) * T + t) * H + h) * N  # [L]
        m2 = valid[:, None]
        if SAVE:
            tl.store(S_ptr + (bh.to(tl.int64) * NC + c) * N * N + j[:, None] * N + i[None, :], ST)
        ahat, rhat, btil, ktil, bl, kl, g_last, _g, _logd = _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, j,
                                                                         valid)
        strict, incl, first, last, keep_end = _chunk_masks(st_ptr, b, T, t, valid, tt, HAS_ST)
        vv = tl.load(v_ptr + off[:, None] + i[None, :], mask=m2, other=0.0).to(tl.float32)
        _m_ab, m_ak, q_rb, q_rk, inv = _chunk_products(ahat, rhat, btil, ktil, strict, incl, LOG2L, PREC)
        u = _dot(inv, _dot(tl.where(first, ahat, 0.0), ST, PREC) + _dot(m_ak, vv, PREC), PREC)
        y = (_dot(tl.where(first, rhat, 0.0), ST, PREC) + _dot(q_rb, u, PREC)
             + _dot(q_rk, vv, PREC))
        tl.store(y_ptr + off[:, None] + i[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
        ST = (keep_end * tl.exp(g_last))[:, None] * ST + (
            _dot(tl.trans(tl.where(last, bl, 0.0)), u, PREC)
            + _dot(tl.trans(tl.where(last, kl, 0.0)), vv, PREC))
    tl.store(sT_ptr + s_base + i[None, :] * N + j[:, None], ST)


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _bwd_walk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, st_ptr, dy_ptr, dsT_ptr, dSn_ptr, ds0_ptr, T, NC, H,
              N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, LOG2L: tl.constexpr, HAS_DST: tl.constexpr,
              HAS_ST: tl.constexpr, PREC: tl.constexpr):
    """The reverse walk over chunks, carrying the state's gradient with the chunk algebra made again in registers:
    dS_c^T = r^0^T dY + keep e^gl dS_{c+1}^T + W_a^T (Q_rb^T dY + bl dS_{c+1}^T), W_a = inv a^0."""
    bh, b, h, tt, j, i, s_base, dST = _walk_start(dsT_ptr, H, N, L, BV, HAS_DST)
    for cc in range(0, NC):
        c = NC - 1 - cc
        tl.store(dSn_ptr + (bh.to(tl.int64) * NC + c) * N * N + j[:, None] * N + i[None, :], dST)
        t = c * L + tt
        valid = t < T
        off = ((b.to(tl.int64) * T + t) * H + h) * N
        ahat, rhat, btil, ktil, bl, _kl, g_last, _g, _logd = _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, j,
                                                                          valid)
        strict, incl, first, last, keep_end = _chunk_masks(st_ptr, b, T, t, valid, tt, HAS_ST)
        _m_ab, _m_ak, q_rb, _q_rk, inv = _chunk_products(ahat, rhat, btil, ktil, strict, incl, LOG2L, PREC)
        wa = _dot(inv, tl.where(first, ahat, 0.0), PREC)  # [L, N]
        dyc = tl.load(dy_ptr + off[:, None] + i[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        tmp = (_dot(tl.trans(q_rb), dyc, PREC)
               + _dot(tl.where(last, bl, 0.0), dST, PREC))  # [L, BV]
        dST = ((keep_end * tl.exp(g_last))[:, None] * dST
               + _dot(tl.trans(tl.where(first, rhat, 0.0)), dyc, PREC)
               + _dot(tl.trans(wa), tmp, PREC))
    tl.store(ds0_ptr + s_base + i[None, :] * N + j[:, None], dST)


@triton.jit
def _bwd_chunk_setup(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, T, NC, H, N: tl.constexpr, L: tl.constexpr,
                     LOG2L: tl.constexpr, HAS_ST: tl.constexpr, PREC: tl.constexpr):
    """What every per-chunk backward program makes first, one program per (head, chunk): its place, the chunk's
    decay-scaled keys, masks and products again, and v. Tensors that enter products only are rounded once where
    they are made (`_rnd`); `_dot_pre`'s flags say which operand already is: the bits of rounding in every product,
    with fewer live copies."""
    pid = tl.program_id(0)  # one grid axis (chunk-major within a head): the y axis would cap T at 65535 chunks
    bh = pid // NC
    c = pid % NC
    b = bh // H
    h = bh % H
    tt = tl.arange(0, L)
    j = tl.arange(0, N)
    t = c * L + tt
    valid = t < T
    m2 = valid[:, None]
    off = ((b.to(tl.int64) * T + t) * H + h) * N
    full = off[:, None] + j[None, :]
    ahat, rhat, btil, ktil, bl, kl, g_last, G, logd = _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, j, valid)
    strict, incl, first, last, keep_end = _chunk_masks(st_ptr, b, T, t, valid, tt, HAS_ST)
    bl = tl.where(last, bl, 0.0)
    kl = tl.where(last, kl, 0.0)
    vv = _rnd(tl.load(v_ptr + full, mask=m2, other=0.0).to(tl.float32), PREC)
    _m_ab, m_ak, q_rb, q_rk, inv = _chunk_products(ahat, rhat, btil, ktil, strict, incl, LOG2L, PREC)
    m_ak, q_rb, q_rk, inv = _rnd(m_ak, PREC), _rnd(q_rb, PREC), _rnd(q_rk, PREC), _rnd(inv, PREC)
    ahat0 = _rnd(tl.where(first, ahat, 0.0), PREC)
    x = _rnd(_dot_pre(m_ak, vv, PREC, True, True), PREC)  # X = M_ak V
    return (bh, c, j, full, m2, ahat, rhat, btil, ktil, bl, kl, g_last, G, logd, strict, incl, first, last, keep_end,
            vv, ahat0, m_ak, q_rb, q_rk, inv, x)


@triton.jit
def _bwd_state_side(dy, ST, dD, bl, kl, g_last, incl, last, keep_end, vv, ahat0, m_ak, q_rb, q_rk, inv, x,
                    PREC: tl.constexpr):
    """The per-chunk backward's first half: every product with the chunk's state S_c or dS_{c+1} ([64, 64]) as an
    operand, giving the gradients of W_a, Z, Q_rb and Q_rk (dwa, dz, d_qrb, d_qrk: rounded, they enter products
    only), of R' (d_rp), of the chunk's end keys bl, kl and its log decay (dbl, dkl, dgl), and dv's first part."""
    wa = _rnd(_dot_pre(inv, ahat0, PREC, True, True), PREC)
    z = _dot_pre(inv, x, PREC, True, True)
    # Y = R' S^T + Y0,  S_next^T = A S^T + D:  dR' = dY S,  dA = dS_next S^T (as [key, key]),  dD = dS_next.
    # dA (64 x 64 x 64) is never formed: it enters only as bl dA = (bl dD) S^T, wa dA^T = (wa S^T) dD^T and its
    # diagonal, an element-wise product; that is 23% fewer multiply-adds and no 64 x 64 tile held.
    d_rp = _dot_pre(dy, tl.trans(ST), PREC, True, False)
    # Y0 = Q_rb Z + Q_rk V,  R' = r^0 + Q_rb W_a,  A = diag(e^gl) + bl^T W_a,  D = bl^T Z + kl^T V
    d_qrb = _rnd(tl.where(incl, _dot_pre(dy, tl.trans(z), PREC, True, False)
                          + _dot_pre(d_rp, tl.trans(wa), PREC, False, True), 0.0), PREC)
    d_qrk = _rnd(tl.where(incl, _dot_pre(dy, tl.trans(vv), PREC, True, True), 0.0), PREC)
    bl_dD = _dot(bl, dD, PREC)  # [L, value]
    dz = _rnd(_dot_pre(tl.trans(q_rb), dy, PREC, True, True) + bl_dD, PREC)
    dv = _dot_pre(tl.trans(q_rk), dy, PREC, True, True) + _dot(kl, dD, PREC)
    dwa = _rnd(_dot_pre(tl.trans(q_rb), d_rp, PREC, True, False) + _dot(bl_dD, tl.trans(ST), PREC), PREC)
    u = _dot_pre(wa, ST, PREC, True, False) + z  # the forward's U = W_a S^T + Z, [L, value]
    dbl = tl.where(last, _dot(u, tl.trans(dD), PREC), 0.0)
    dkl = tl.where(last, _dot_pre(vv, tl.trans(dD), PREC, True, False), 0.0)
    diag_dA = tl.sum(dD * ST, axis=1)
    dgl = keep_end * diag_dA * tl.exp(g_last) + tl.sum(dbl * bl + dkl * kl, axis=0)
    return dwa, dz, d_qrb, d_qrk, d_rp, dbl, dkl, dgl, dv


@triton.jit
def _bwd_key_side(dwa, dz, d_qrb, d_qrk, d_rp, dbl, dkl, dgl, dv, ahat, rhat, btil, ktil, bl, kl, g_last, G, logd,
                  strict, first, vv, ahat0, m_ak, inv, x, w_ptr, full, m2, dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr,
                  db_ptr, PREC: tl.constexpr):
    """The per-chunk backward's second half: the chain rule through W_a = inv a^0, Z = inv X and the inverse
    (I - M_ab)^-1 to the four products of decay-scaled keys, then through the decay scalings to every input
    gradient of the chunk (stored)."""
    inv_t = tl.trans(inv)
    dahat0 = _dot_pre(inv_t, dwa, PREC, True, True)
    dinv = _rnd(_dot_pre(dwa, tl.trans(ahat0), PREC, True, True) + _dot_pre(dz, tl.trans(x), PREC, True, True), PREC)
    dx = _rnd(_dot_pre(inv_t, dz, PREC, True, True), PREC)
    dm_ak = _rnd(tl.where(strict, _dot_pre(dx, tl.trans(vv), PREC, True, True), 0.0), PREC)
    dv += _dot_pre(tl.trans(m_ak), dx, PREC, True, True)
    dm_ab = _rnd(tl.where(strict, _dot_pre(_rnd(_dot_pre(inv_t, dinv, PREC, True, True), PREC), inv_t, PREC, True,
                                           True), 0.0), PREC)
    # the four products of decay-scaled keys
    dahat = (tl.where(first, dahat0, 0.0) + _dot_pre(dm_ab, btil, PREC, True, False)
             + _dot_pre(dm_ak, ktil, PREC, True, False))
    dbtil = _dot_pre(tl.trans(dm_ab), ahat, PREC, True, False) + _dot_pre(tl.trans(d_qrb), rhat, PREC, True, False)
    dktil = _dot_pre(tl.trans(dm_ak), ahat, PREC, True, False) + _dot_pre(tl.trans(d_qrk), rhat, PREC, True, False)
    drhat = (tl.where(first, d_rp, 0.0) + _dot_pre(d_qrb, btil, PREC, True, False)
             + _dot_pre(d_qrk, ktil, PREC, True, False))
    # G = cumsum(log d), G_{t-1} = G - log d, g_last = sum(log d), log d = -e^-0.5 sigmoid(w)
    gx = G - logd
    da = dahat * tl.exp(gx)
    d_gx = dahat * ahat
    dr = drhat * tl.exp(G)
    dG = drhat * rhat - dbtil * btil - dktil * ktil - dbl * bl - dkl * kl
    db = dbtil * tl.exp(-G) + dbl * tl.exp(g_last[None, :] - G)
    dk = dktil * tl.exp(-G) + dkl * tl.exp(g_last[None, :] - G)
    dlogd = (tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG  # sum over s >= t
             + tl.sum(d_gx, axis=0)[None, :] - tl.cumsum(d_gx, axis=0)  # sum over s > t
             + dgl[None, :])
    wr = tl.load(w_ptr + full, mask=m2, other=0.0).to(tl.float32)
    dw = dlogd * (-0.6065306597126334) * tl.sigmoid(wr) * tl.sigmoid(-wr)  # not s (1 - s): 0 in fp32 at w >= 17
    tl.store(dr_ptr + full, dr.to(dr_ptr.dtype.element_ty), mask=m2)
    tl.store(dw_ptr + full, dw.to(dw_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + full, dk.to(dk_ptr.dtype.element_ty), mask=m2)
    tl.store(dv_ptr + full, dv.to(dv_ptr.dtype.element_ty), mask=m2)
    tl.store(da_ptr + full, da.to(da_ptr.dtype.element_ty), mask=m2)
    tl.store(db_ptr + full, db.to(db_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_state_inputs(S_ptr, dSn_ptr, dy_ptr, bh, c, NC, j, full, m2, N: tl.constexpr, PREC: tl.constexpr):
    """dY (rounded: it enters products only), the chunk's initial state S_c^T and dS_{c+1}^T ([key, value])."""
    dy = _rnd(tl.load(dy_ptr + full, mask=m2, other=0.0).to(tl.float32), PREC)
    mb = (bh.to(tl.int64) * NC + c) * N * N
    ST = tl.load(S_ptr + mb + j[:, None] * N + j[None, :])
    dD = tl.load(dSn_ptr + mb + j[:, None] * N + j[None, :])
    return dy, ST, dD


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _bwd_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, S_ptr, dSn_ptr, dy_ptr, dr_ptr, dw_ptr, dk_ptr,
               dv_ptr, da_ptr, db_ptr, T, NC, H, N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr,
               HAS_ST: tl.constexpr, PREC: tl.constexpr):
    """The backward's per-chunk kernel, every chunk at once (all 64 value channels per program): the gradients of
    the chunk's inputs from dY, its initial state S_c and dS_{c+1}, by the chain rule through the chunk algebra."""
    (bh, c, j, full, m2, ahat, rhat, btil, ktil, bl, kl, g_last, G, logd, strict, incl, first, last, keep_end,
     vv, ahat0, m_ak, q_rb, q_rk, inv, x) = _bwd_chunk_setup(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, T, NC,
                                                             H, N, L, LOG2L, HAS_ST, PREC)
    dy, ST, dD = _bwd_state_inputs(S_ptr, dSn_ptr, dy_ptr, bh, c, NC, j, full, m2, N, PREC)
    dwa, dz, d_qrb, d_qrk, d_rp, dbl, dkl, dgl, dv = _bwd_state_side(
        dy, ST, dD, bl, kl, g_last, incl, last, keep_end, vv, ahat0, m_ak, q_rb, q_rk, inv, x, PREC)
    _bwd_key_side(dwa, dz, d_qrb, d_qrk, d_rp, dbl, dkl, dgl, dv, ahat, rhat, btil, ktil, bl, kl, g_last, G, logd,
                  strict, first, vv, ahat0, m_ak, inv, x, w_ptr, full, m2, dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr,
                  db_ptr, PREC)
