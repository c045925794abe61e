"""The CUDA WKV7 kernel against the float64 reference, and the base model end to end. Needs a CUDA device.

Inputs are shaped like the model's (kk unit per head, a = -kk, b = kk * iclr); every output and gradient,
the initial state's included, must be within rel L2 3e-3 of float64 for bf16 inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fast_testutil import rel
from wkv_testutil import reset_marks, wkv_inputs

from rwkv_music.model.wkv import wkv_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL_BF16 = 3e-3
TOL_F32 = 1e-4


@pytest.fixture(scope="module")
def wkv_cuda():
    from rwkv_music.model import wkv_cuda

    if not wkv_cuda.is_available():
        pytest.fail(f"CUDA present but the WKV extension did not build/load: {wkv_cuda.load_error()}")
    return wkv_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "T", "H", "state"), [(2, 100, 3, True), (1, 1, 2, True), (3, 257, 2, False)])
@pytest.mark.parametrize("cfg", [None, (0, 0, 4), (2, 2, 6)])
def test_kernel_matches_float64(wkv_cuda, B, T, H, state, dtype, cfg) -> None:
    xs, s0, dy, dsT = wkv_inputs(B, T, H, dtype, seed=B * 1000 + T, state=state)
    ref_in = [x.double().requires_grad_() for x in xs]
    ref_s0 = s0.double().requires_grad_() if state else None
    y_ref, sT_ref = wkv_reference(*ref_in, ref_s0)
    torch.autograd.backward([y_ref, sT_ref], [dy.double(), dsT.double()])

    ins = [x.clone().requires_grad_() for x in xs]
    st = s0.clone().requires_grad_() if state else None
    y, sT = wkv_cuda.wkv_cuda(*ins, st, cfg=cfg)
    assert y.dtype == dtype and sT.dtype == torch.float32
    torch.autograd.backward([y, sT], [dy, dsT])

    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_F32
    pairs = {"y": (y, y_ref), "sT": (sT, sT_ref)}
    pairs.update({n: (a.grad, b.grad) for n, a, b in zip("rwkvab", ins, ref_in, strict=True)})
    if state:
        pairs["s0"] = (st.grad, ref_s0.grad)
    errs = {n: rel(a, b) for n, (a, b) in pairs.items()}
    assert max(errs.values()) < tol, errs


def test_no_grad_forward_and_final_state_only(wkv_cuda) -> None:
    """Inference forward (no checkpoints) equals the training forward; a loss on the state alone works."""
    xs, s0, _, dsT = wkv_inputs(2, 37, 2, torch.bfloat16, seed=5)
    with torch.no_grad():
        y0, s_0 = wkv_cuda.wkv_cuda(*xs, s0)
    ins = [x.clone().requires_grad_() for x in xs]
    y1, s_1 = wkv_cuda.wkv_cuda(*ins, s0)
    assert torch.equal(y0, y1) and torch.equal(s_0, s_1)
    (s_1 * dsT).sum().backward()
    ref_in = [x.double().requires_grad_() for x in xs]
    _, sT_ref = wkv_reference(*ref_in, s0.double())
    (sT_ref * dsT.double()).sum().backward()
    for a, b in zip(ins, ref_in, strict=True):
        if b.grad is None:  # the final state does not depend on r
            assert a.grad is None or not a.grad.any()
        else:
            assert rel(a.grad, b.grad) < TOL_BF16


def test_step_matches_reference_and_inplace(wkv_cuda) -> None:
    xs, s0, _, _ = wkv_inputs(4, 1, 3, torch.bfloat16, seed=9)
    one = [x[:, 0].contiguous() for x in xs]
    y_ref, s_ref = wkv_reference(*xs, s0)
    y, s = wkv_cuda.wkv_cuda_step(*one, s0)
    assert rel(y, y_ref[:, 0]) < TOL_BF16 and rel(s, s_ref) < 1e-5
    buf = s0.clone()
    y2, s2 = wkv_cuda.wkv_cuda_step(*one, buf, out=buf)
    assert s2.data_ptr() == buf.data_ptr() and torch.equal(s2, s) and torch.equal(y2, y)
    y0, _ = wkv_cuda.wkv_cuda_step(*one, None)
    y0_ref, _ = wkv_reference(*xs, None)
    assert rel(y0, y0_ref[:, 0]) < TOL_BF16


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_base_preset_matches_cpu_fp32(wkv_cuda, monkeypatch, impl) -> None:
    """Base preset (L12 D768): loss and gradients with the kernel (`impl`: the CUDA scan or the chunked Triton
    kernels) under bf16 autocast match the CPU fp32
    path on the same weights within bf16 tolerance: the loss within 1%, all gradients together within 5%,
    and each parameter's gradient no further from fp32 than 3x the chunked PyTorch path's own bf16 error
    (+1e-2), since some small gradients are dominated by bf16 rounding elsewhere in the model."""
    from rwkv_music.model import RWKV7, from_preset

    cfg = from_preset("base", vocab_size=512)
    torch.manual_seed(0)
    model = RWKV7(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 129), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (2, 129), generator=g)

    def run(device, impl, autocast):
        model.wkv_backend = impl
        model.to(device).zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(idx.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.to(device).flatten())
        loss.backward()
        return loss.item(), [p.grad.detach().float().cpu() for p in model.parameters()]

    ref_loss, ref_grads = run("cpu", "torch", autocast=False)
    loss, grads = run("cuda", impl, autocast=True)
    _, torch_grads = run("cuda", "torch", autocast=True)

    def flat(gs):
        return torch.cat([x.flatten() for x in gs])

    total = rel(flat(grads), flat(ref_grads))
    errs = [(rel(a, r), rel(b, r), n) for a, b, r, n in zip(grads, torch_grads, ref_grads, names, strict=True)
            if r.norm() > 0]
    worst = sorted(errs, reverse=True)[:3]
    print(f"base preset: loss {loss:.6f} vs cpu fp32 {ref_loss:.6f}; grad rel L2 all {total:.2e} "
          f"(chunked bf16 {rel(flat(torch_grads), flat(ref_grads)):.2e}); worst (kernel, chunked, name) {worst}")
    assert abs(loss - ref_loss) < 1e-2 * abs(ref_loss)
    assert total < 5e-2
    for e_kernel, e_torch, name in errs:
        assert e_kernel < 3 * e_torch + 1e-2, (name, e_kernel, e_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "T", "H"), [(3, 17, 2), (3, 100, 3), (2, 257, 2), (3, 1000, 1)])
@pytest.mark.parametrize("cfg", [None, (0, 0, 4), (2, 2, 6)])
def test_resets_match_float64(wkv_cuda, B, T, H, dtype, cfg) -> None:
    """Packed rows: y, the final state and every gradient (initial state included) against float64."""
    xs, s0, dy, dsT = wkv_inputs(B, T, H, dtype, seed=7 * T + B)
    starts = reset_marks(B, T, seed=T)
    ref_in = [x.double().requires_grad_() for x in xs]
    ref_s0 = s0.double().requires_grad_()
    y_ref, sT_ref = wkv_reference(*ref_in, ref_s0, starts=starts)
    torch.autograd.backward([y_ref, sT_ref], [dy.double(), dsT.double()])
    ins = [x.clone().requires_grad_() for x in xs]
    st = s0.clone().requires_grad_()
    y, sT = wkv_cuda.wkv_cuda(*ins, st, starts=starts, cfg=cfg)
    torch.autograd.backward([y, sT], [dy, dsT])
    pairs = {"y": (y, y_ref), "sT": (sT, sT_ref), "s0": (st.grad, ref_s0.grad)}
    pairs.update({n: (a.grad, b.grad) for n, a, b in zip("rwkvab", ins, ref_in, strict=True)})
    errs = {n: rel(a, b) for n, (a, b) in pairs.items()}
    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_F32
    assert max(errs.values()) < tol, errs
    assert not st.grad[0].any()  # row 0 resets at t = 0: its initial state gets no gradient


@pytest.mark.parametrize("w_raw", [-30.0, 30.0])
def test_decay_extremes_stay_finite_and_exact(wkv_cuda, w_raw) -> None:
    """w as the model can produce it at both ends: decay -> 1 (sigmoid -> 0) and decay = 0.545."""
    xs, s0, dy, dsT = wkv_inputs(2, 300, 2, torch.float32, seed=int(w_raw))
    xs[1] = torch.full_like(xs[1], w_raw)
    ref_in = [x.double().requires_grad_() for x in xs]
    y_ref, sT_ref = wkv_reference(*ref_in, s0.double())
    torch.autograd.backward([y_ref, sT_ref], [dy.double(), dsT.double()])
    ins = [x.clone().requires_grad_() for x in xs]
    y, sT = wkv_cuda.wkv_cuda(*ins, s0)
    torch.autograd.backward([y, sT], [dy, dsT])
    for a, b in [(y, y_ref), (sT, sT_ref), *((x.grad, r.grad) for x, r in zip(ins, ref_in, strict=True))]:
        assert torch.isfinite(a).all()
        # fp32 inputs: far inside the 2e-3 asked of bf16 (fast-math exp at d = 0.545). At sigmoid(30) the
        # decay gradient is ~1e-13 in float64 and exactly 0 in fp32: an absolute floor covers that.
        err = (a.double() - b.double()).norm().item()
        assert err <= 1e-3 * b.double().norm().item() + 1e-9


@pytest.mark.parametrize("recompute", ["none", "elementwise"])
def test_compiled_model_with_kernel_matches_eager(wkv_cuda, recompute) -> None:
    """torch.compile traces through the custom ops (packed rows included): same loss and gradients, also when
    backward recomputes the element-wise work (the compiled run's `recompute`; the eager run keeps all)."""
    from rwkv_music.model import RWKV7, RWKV7Config

    torch._dynamo.reset()
    torch.manual_seed(3)
    model = RWKV7(RWKV7Config(vocab_size=200, n_layer=2, n_embd=128)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 200, (4, 190), generator=g).cuda()
    starts = reset_marks(4, 190, seed=5)
    mask = (torch.rand(4, 190, generator=g) > 0.6).cuda()
    tgt = torch.randint(0, 200, (int(mask.sum()),), generator=g).cuda()

    def run(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(idx, positions=mask, starts=starts).float(), tgt)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss_e, g_e = run(model)
    from rwkv_music.model.compile import compile_for_training

    compiled = compile_for_training(model)
    model.recompute = recompute
    loss_c, g_c = run(compiled)
    loss_c2, _ = run(compiled)  # a second call reuses the graph
    assert abs(loss_c - loss_e) < 1e-2 * abs(loss_e) and loss_c2 == pytest.approx(loss_c, rel=1e-6)
    assert rel(g_c, g_e) < 3e-2


def test_recompute_elementwise_keeps_less(wkv_cuda) -> None:
    """A compiled training step that recomputes the element-wise work peaks lower than one that keeps it."""
    from rwkv_music.model import RWKV7, RWKV7Config
    from rwkv_music.model.compile import compile_for_training

    idx = torch.randint(0, 200, (8, 1024), device="cuda")
    peaks = {}
    for mode in ("none", "elementwise"):
        torch._dynamo.reset()
        torch.manual_seed(3)
        model = RWKV7(RWKV7Config(vocab_size=200, n_layer=4, n_embd=256)).cuda()
        model.recompute = mode
        compiled = compile_for_training(model)
        for _ in range(2):  # the first step compiles
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(idx).float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model, compiled, loss
    print(f"peak growth of a step (MiB): {({k: v / 2**20 for k, v in peaks.items()})}")
    assert peaks["elementwise"] < 0.85 * peaks["none"]
