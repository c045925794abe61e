"""RWKV7 module: config, parallel vs RNN mode, state passing, logit slicing, training signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testutil import randomised_model, rel_err

from rwkv_music.model import PRESETS, RWKV7, RWKV7Config, RWKV7State, from_preset


def test_presets_and_derived_dims() -> None:
    assert PRESETS == {"tiny": (4, 128), "small": (6, 512), "base": (12, 768), "large": (24, 1024)}
    expect = {  # (w, a, v, g) ranks from RWKV-LM's formulas; 1024 shows Python's round-half-even (2.5 -> 2)
        "tiny": (32, 32, 32, 64),
        "small": (64, 64, 32, 128),
        "base": (64, 64, 32, 128),
        "large": (64, 64, 64, 160),
    }
    for name, ranks in expect.items():
        cfg = from_preset(name, vocab_size=300)
        assert (cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) == ranks
        assert cfg.dim_ffn == 4 * cfg.n_embd and cfg.n_head == cfg.n_embd // 64
        assert RWKV7Config.from_dict(cfg.to_dict()) == cfg
    assert RWKV7(from_preset("tiny", 300)).num_params() == from_preset("tiny", 300).num_params()
    with pytest.raises(ValueError, match="preset"):
        from_preset("huge", 300)
    with pytest.raises(ValueError, match="head_size"):
        RWKV7Config(vocab_size=10, n_embd=100)


def test_every_weight_is_a_registered_parameter(tiny_model: RWKV7) -> None:
    names = {n for n, _ in tiny_model.named_parameters()}
    per_layer = {
        "ln1.weight", "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.w1",
        "att.w2", "att.a0", "att.a1", "att.a2", "att.g1", "att.g2", "att.k_k", "att.k_a", "att.r_k",
        "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
        "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight", "ln2.bias",
    }  # fmt: skip
    for i in range(tiny_model.cfg.n_layer):
        assert {f"blocks.{i}.{n}" for n in per_layer} <= names
        assert ({f"blocks.{i}.att.v{j}" for j in range(3)} <= names) == (i > 0)
    assert {"emb.weight", "blocks.0.ln0.weight", "ln_out.weight", "head.weight"} <= names
    assert set(tiny_model.state_dict()) == names  # no buffers hiding weights


def test_parallel_equals_rnn_steps(tiny_model: RWKV7) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = tiny_model(idx, return_state=True)
        s = None
        steps = []
        for t in range(idx.shape[1]):
            out, s = tiny_model.step(idx[:, t], s)
            steps.append(out)
    assert logits.shape == (3, 37, tiny_model.cfg.vocab_size)
    assert rel_err(torch.stack(steps, 1), logits) < 1e-4
    for a, b in ((s.att_x, state.att_x), (s.wkv, state.wkv), (s.ffn_x, state.ffn_x)):
        assert rel_err(a, b) < 1e-4


def test_prefill_in_chunks_equals_one_call(tiny_model: RWKV7) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, s_full = tiny_model(idx, return_state=True)
        a, s1 = tiny_model(idx[:, :21], return_state=True)
        b, s2 = tiny_model(idx[:, 21:], state=s1, return_state=True)
        nxt = torch.tensor([5, 7])
        assert rel_err(tiny_model.step(nxt, s2)[0], tiny_model.step(nxt, s_full)[0]) < 1e-5
    assert rel_err(torch.cat([a, b], 1), full) < 1e-5
    assert rel_err(s2.wkv, s_full.wkv) < 1e-5
    assert s2.wkv.dtype == torch.float32 and s2.wkv.shape == (3, 2, 2, 64, 64)


def test_state_helpers(tiny_model: RWKV7) -> None:
    cfg = tiny_model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        last, s = tiny_model(prompt, positions=torch.tensor([11]), return_state=True)
        big = s.expand(4)
        assert big.batch_size == 4 and big.n_layer == cfg.n_layer
        out, big2 = tiny_model.step(torch.tensor([1, 2, 3, 1]), big)
        single, _ = tiny_model.step(torch.tensor([1]), s)
        assert torch.allclose(out[0], single[0], atol=1e-5) and torch.allclose(out[3], single[0], atol=1e-5)
        picked = big2.index(torch.tensor([1, 2]))
        out_p, _ = tiny_model.step(torch.tensor([4, 4]), picked)
        out_all, _ = tiny_model.step(torch.tensor([4, 4, 4, 4]), big2)
        assert torch.allclose(out_p, out_all[1:3], atol=1e-5)
    assert last.shape == (1, cfg.vocab_size)
    z = RWKV7State.zeros(cfg, 2)
    assert z.wkv.shape == (cfg.n_layer, 2, cfg.n_head, 64, 64)
    with torch.no_grad():  # the explicit zero state is the same as state=None
        assert torch.equal(tiny_model(prompt.repeat(2, 1), state=z), tiny_model(prompt.repeat(2, 1)))
    buf = RWKV7State.zeros(cfg, 4)
    buf.copy_(big2)
    assert torch.equal(buf.wkv, big2.wkv)
    assert RWKV7State.cat([s, s]).batch_size == 2 and s.repeat_interleave(3).batch_size == 3


def test_logit_slicing_values_and_gradients(tiny_cfg: RWKV7Config) -> None:
    model = randomised_model(tiny_cfg, seed=2).train()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 30), generator=g)
    mask = torch.rand(2, 30, generator=g) > 0.6
    targets = torch.randint(0, tiny_cfg.vocab_size, (int(mask.sum()),), generator=g)

    full = model(idx)
    loss_full = F.cross_entropy(full[mask], targets)
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()))
    sliced = model(idx, positions=mask)
    assert sliced.shape == (int(mask.sum()), tiny_cfg.vocab_size)
    assert torch.allclose(sliced, full[mask], atol=1e-6)
    loss_sliced = F.cross_entropy(sliced, targets)
    grads_sliced = torch.autograd.grad(loss_sliced, list(model.parameters()))
    for a, b in zip(grads_full, grads_sliced, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    # the same rows as flat indices (what fit passes: found on the host, no device sync), the same gradients
    flat = torch.tensor([i for i, m in enumerate(mask.flatten().tolist()) if m])
    by_index = model(idx, flat_positions=flat)
    assert torch.equal(by_index, sliced)
    grads_flat = torch.autograd.grad(F.cross_entropy(by_index, targets), list(model.parameters()))
    for a, b in zip(grads_flat, grads_sliced, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(idx, positions=mask, flat_positions=flat)

    pos = torch.tensor([29, 4])
    assert torch.allclose(model(idx, positions=pos), full[torch.arange(2), pos], atol=1e-6)
    pos2 = torch.tensor([[0, 5, 6], [1, 2, 29]])
    assert torch.allclose(model(idx, positions=pos2), torch.stack([full[0, pos2[0]], full[1, pos2[1]]]), atol=1e-6)
    h = model.hidden(idx)
    assert torch.allclose(model.head(h), full, atol=1e-6)


def test_training_changes_every_parameter(tiny_cfg: RWKV7Config) -> None:
    """Guards against weights that never train. From RWKV-LM's init the output projections are zero, so
    the first step only moves the head/output side; by the third step every tensor has moved."""
    torch.manual_seed(4)
    model = RWKV7(tiny_cfg).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith(".weight")]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n.endswith(".weight"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["elementwise", "blocks"])
def test_recompute_gives_same_gradients(tiny_cfg: RWKV7Config, mode: str) -> None:
    """Recomputing in backward changes what is kept, not the function: the same loss and gradients as keeping
    everything, with packed-row resets and an initial state in play."""
    gen = torch.Generator().manual_seed(6)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 20), generator=gen)
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[1, 9] = True
    results = []
    for m in ("none", mode):
        model = randomised_model(tiny_cfg, seed=7).train()
        model.recompute = m
        with torch.no_grad():
            _, state = model(idx[:, :7], return_state=True)
        loss = model(idx, state=state, starts=starts).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_grad_checkpoint_is_recompute_blocks(tiny_cfg: RWKV7Config) -> None:
    model = RWKV7(tiny_cfg)
    model.grad_checkpoint = True
    assert model.recompute == "blocks" and model.grad_checkpoint is True
    model.recompute = "elementwise"
    assert model.grad_checkpoint is False
    model.recompute = "sometimes"
    with pytest.raises(ValueError, match="recompute must be one of"):
        model.train()(torch.zeros(1, 3, dtype=torch.long))


def test_bad_positions_are_rejected(tiny_model: RWKV7) -> None:
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="mask shape"):
        tiny_model(idx, positions=torch.ones(2, 4, dtype=torch.bool))


def test_bf16_autocast_forward_backward(tiny_cfg: RWKV7Config) -> None:
    """Mixed precision (CPU autocast stands in for CUDA's): runs, keeps the WKV state fp32, stays close."""
    model = randomised_model(tiny_cfg, seed=11).train()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(12))
    ref = model(idx[:, :20]).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(idx[:, :20], return_state=True)
        more = model(idx[:, 20:], state=state)
    assert state.wkv.dtype == torch.float32
    assert rel_err(logits.float(), ref) < 5e-2
    (logits.float().square().mean() + more.float().square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_packed_rows_equal_separate_sequences(tiny_cfg: RWKV7Config) -> None:
    """Several sequences in one row with `starts`: the same logits and gradients as each run on its own."""
    g = torch.Generator().manual_seed(11)
    lengths = [[7, 20, 5], [33], [1, 16, 15]]  # a one-token sequence, lengths at and around the chunk size
    seqs = [[torch.randint(0, tiny_cfg.vocab_size, (n,), generator=g) for n in row] for row in lengths]
    T = max(sum(row) for row in lengths)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    starts = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, row in enumerate(seqs):
        off = 0
        for s in row:
            idx[b, off : off + len(s)] = s
            starts[b, off] = True
            off += len(s)

    def run(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = randomised_model(tiny_cfg, seed=12).train()
        out = fn(model)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    def packed(model):
        logits = model(idx, starts=starts)
        keep = [logits[b, : sum(lengths[b])] for b in range(len(seqs))]
        return torch.cat(keep)

    def separate(model):
        return torch.cat([model(s[None])[0] for row in seqs for s in row])

    (y_p, g_p), (y_s, g_s) = run(packed), run(separate)
    assert rel_err(y_p, y_s) < 1e-5
    for a, b in zip(g_p, g_s, strict=True):
        assert rel_err(a, b) < 1e-4


def test_recompute_elementwise_keeps_products_and_reruns_the_rest(tiny_cfg: RWKV7Config) -> None:
    """What runs in backward, op by op: "elementwise" runs no matrix product again (the forward's are kept) but
    runs element-wise work again; "blocks" runs the products again too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.products = self.others = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                self.products += 1
            else:
                self.others += 1
            return func(*args, **(kwargs or {}))

    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    counts = {}
    for mode in ("none", "elementwise", "blocks"):
        model = randomised_model(tiny_cfg, seed=7).train()
        model.recompute = mode
        loss = model(idx).square().mean()
        with Count() as c:
            loss.backward()
        counts[mode] = (c.products, c.others)
    print(f"backward ops (products, others): {counts}")
    (p_none, o_none), (p_elem, o_elem), (p_blocks, _) = counts.values()
    assert p_elem == p_none < p_blocks, counts
    assert o_elem > o_none, counts


def test_relu_square_takes_its_derivative_from_its_output() -> None:
    """The channel mix's relu(x)^2 saves only y and returns 2 sqrt(y) * grad: the same gradient as autograd's
    2 relu(x) * grad (float64 gradcheck, zeros and negatives included), and in bf16 within bf16 rounding."""
    from rwkv_music.model.rwkv7 import _ReluSquare

    x = torch.randn(64, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, :5] = 0.0
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(_ReluSquare.apply, (x,))
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    g = torch.randn_like(xb)
    _ReluSquare.apply(xb).backward(g)
    want = (2 * torch.relu(xb.double()) * g.double())
    assert rel_err(xb.grad.double(), want) < 4e-3
