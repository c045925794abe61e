"""The model on a GPU: the CUDA WKV kernel (through `wkv` dispatch) against the chunked PyTorch path,
in fp32 and under bf16 autocast, and RNN steps against the parallel mode. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testutil import randomised_model, rel_err

from rwkv_music.model import RWKV7Config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_cfg() -> RWKV7Config:
    return RWKV7Config(vocab_size=300, n_layer=3, n_embd=256)


def _run(model, idx, mask, targets, impl: str, monkeypatch: pytest.MonkeyPatch, autocast: bool):
    model.wkv_backend = impl
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx, positions=mask)
        loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    return logits.float().detach(), [p.grad.detach().clone() for p in model.parameters()]


def test_cuda_kernel_matches_chunked_torch(gpu_cfg, monkeypatch) -> None:
    """fp32: kernel and chunked path agree closely. bf16 autocast: the kernel's error against the fp32
    result is no worse than the chunked path's own bf16 error (both see the same bf16 inputs)."""
    from rwkv_music.model import wkv_cuda

    if not wkv_cuda.is_available():
        pytest.skip(f"CUDA WKV extension unavailable: {wkv_cuda.load_error()}")
    model = randomised_model(gpu_cfg, seed=20).cuda().train()
    g = torch.Generator().manual_seed(21)
    idx = torch.randint(0, gpu_cfg.vocab_size, (4, 203), generator=g).cuda()  # T not a multiple of 16
    mask = (torch.rand(4, 203, generator=g) > 0.5).cuda()
    targets = torch.randint(0, gpu_cfg.vocab_size, (int(mask.sum()),), generator=g).cuda()
    ref_logits, ref_grads = _run(model, idx, mask, targets, "torch", monkeypatch, autocast=False)
    logits, grads = _run(model, idx, mask, targets, "cuda", monkeypatch, autocast=False)
    assert rel_err(logits, ref_logits) < 1e-4
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) < 1e-3

    bf_torch_logits, bf_torch_grads = _run(model, idx, mask, targets, "torch", monkeypatch, autocast=True)
    bf_logits, bf_grads = _run(model, idx, mask, targets, "cuda", monkeypatch, autocast=True)
    assert rel_err(bf_logits, ref_logits) < 3 * rel_err(bf_torch_logits, ref_logits) + 1e-3
    for a, b, ref in zip(bf_grads, bf_torch_grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        assert rel_err(a, ref) < 3 * rel_err(b, ref) + 1e-2


def test_gpu_step_matches_parallel_and_cpu(gpu_cfg) -> None:
    model = randomised_model(gpu_cfg, seed=22)
    idx = torch.randint(0, gpu_cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        cpu_logits = model(idx)
        model = model.cuda()
        logits, state = model(idx.cuda(), return_state=True)
        s = None
        outs = []
        for t in range(idx.shape[1]):
            out, s = model.step(idx[:, t].cuda(), s)
            outs.append(out)
    assert rel_err(logits.cpu(), cpu_logits) < 1e-4
    assert rel_err(torch.stack(outs, 1), logits) < 1e-4
    assert rel_err(s.wkv, state.wkv) < 1e-4 and s.wkv.dtype == torch.float32


def test_packed_rows_with_kernel_match_chunked(gpu_cfg) -> None:
    """`starts` through the CUDA kernel equals the chunked PyTorch path (fp32)."""
    from rwkv_music.model import wkv_cuda

    if not wkv_cuda.is_available():
        pytest.skip(f"CUDA WKV extension unavailable: {wkv_cuda.load_error()}")
    model = randomised_model(gpu_cfg, seed=30).cuda().train()
    g = torch.Generator().manual_seed(31)
    idx = torch.randint(0, gpu_cfg.vocab_size, (3, 300), generator=g).cuda()
    starts = (torch.rand(3, 300, generator=g) < 0.02).cuda()
    starts[:, 0] = True
    mask = (torch.rand(3, 300, generator=g) > 0.5).cuda()
    targets = torch.randint(0, gpu_cfg.vocab_size, (int(mask.sum()),), generator=g).cuda()
    out = {}
    for impl in ("torch", "cuda"):
        model.wkv_backend = impl
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx, positions=mask, starts=starts).float(), targets)
        loss.backward()
        out[impl] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert out["cuda"][0] == pytest.approx(out["torch"][0], rel=1e-5)
    for a, b in zip(out["cuda"][1], out["torch"][1], strict=True):
        assert rel_err(a, b) < 1e-3
