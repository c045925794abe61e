"""The fused decode step (`model/fast_step.py`) against the readable model step. Needs a CUDA device.

Reference: the readable model in float32 with the PyTorch WKV. In float32 the fused step must match it within
rel L2 1e-4 (logits over 8 steps, and the state after them); in bf16 / fp16 it must be within 1.5x the error
of the readable model run in that same dtype, and within 3e-2 (the readable bf16 step's error is ~1e-2).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from fast_testutil import fast_model, rel, state_err

from rwkv_music.model import RWKV7State

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]
TOL_F32 = 1e-4
needs_sm80 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                reason="bf16 tensor-core products need sm_80 or later")


@torch.no_grad()
def _run(model, steps_fn, prompt, tokens):
    """Prefill `prompt` [B, T], then one step per column of `tokens` [B, S]; logits [S, B, V] and the state."""
    _, state = model(prompt, return_state=True)
    out = []
    for t in range(tokens.shape[1]):
        logits, state = steps_fn(tokens[:, t], state)
        out.append(logits.float())
    return torch.stack(out), state


def _fast_fn(fast):
    def fn(tok, state):
        return fast(tok, state), state  # in place
    return fn


@pytest.mark.parametrize("B", [1, 3, 9])
def test_float32_matches_reference(fast_step_mod, B) -> None:
    ref = fast_model()
    g = torch.Generator(device="cuda").manual_seed(B)
    prompt = torch.randint(0, 470, (B, 21), device="cuda", generator=g)
    tokens = torch.randint(0, 470, (B, 8), device="cuda", generator=g)
    want, want_state = _run(ref, ref.step, prompt, tokens)
    got, got_state = _run(ref, _fast_fn(fast_step_mod.FastStep(ref)), prompt, tokens)
    assert rel(got, want) < TOL_F32
    assert state_err(got_state, want_state) < TOL_F32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_close_as_the_readable_step(fast_step_mod, dtype) -> None:
    ref = fast_model(seed=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 470, (4, 33), device="cuda", generator=g)
    tokens = torch.randint(0, 470, (4, 8), device="cuda", generator=g)
    want, _ = _run(ref, ref.step, prompt, tokens)
    low = fast_model(seed=1).to(dtype)
    readable, _ = _run(low, low.step, prompt, tokens)
    fused, _ = _run(low, _fast_fn(fast_step_mod.FastStep(low)), prompt, tokens)
    e_readable, e_fused = rel(readable, want), rel(fused, want)
    assert e_fused < 3e-2
    assert e_fused <= 1.5 * e_readable, (e_fused, e_readable)


@needs_sm80
def test_bf16_base_shape_as_close_as_the_readable_step(fast_step_mod) -> None:
    """The base preset's shape in bf16 on tensor cores (the default there): several chunks of columns per warp (K =
    768 and 3072)."""
    ref = fast_model(seed=2, n_layer=12, n_embd=768, vocab=640)
    prompt = torch.randint(0, 640, (16, 9), device="cuda")
    tokens = torch.randint(0, 640, (16, 4), device="cuda")
    want, _ = _run(ref, ref.step, prompt, tokens)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    readable, _ = _run(low, low.step, prompt, tokens)
    fast = fast_step_mod.FastStep(low)
    assert fast.tensor_cores
    fused, _ = _run(low, _fast_fn(fast), prompt, tokens)
    e_readable, e_fused = rel(readable, want), rel(fused, want)
    assert e_fused < 3e-2
    assert e_fused <= 1.5 * e_readable, (e_fused, e_readable)


def test_base_shape_and_one_layer(fast_step_mod) -> None:
    """The base preset's shape (L12 D768, LoRA ranks 64/64/32/128) and a model with only layer 0."""
    for n_layer, n_embd in ((12, 768), (1, 128)):
        ref = fast_model(seed=2, n_layer=n_layer, n_embd=n_embd, vocab=640)
        prompt = torch.randint(0, 640, (2, 9), device="cuda")
        tokens = torch.randint(0, 640, (2, 4), device="cuda")
        want, want_state = _run(ref, ref.step, prompt, tokens)
        got, got_state = _run(ref, _fast_fn(fast_step_mod.FastStep(ref)), prompt, tokens)
        assert rel(got, want) < TOL_F32, n_layer
        assert state_err(got_state, want_state) < TOL_F32, n_layer


@pytest.mark.parametrize("B", [1, 3, 9])
def test_odd_lora_ranks(fast_step_mod, B) -> None:
    """Ranks summing to an odd number: the buffers after the projections must stay 16-byte aligned. B = 9: a second
    group of sequences in the projections, holding one."""
    ref = fast_model(seed=6, d_decay_lora=30, d_aaa_lora=18, d_mv_lora=14, d_gate_lora=31)
    prompt = torch.randint(0, 470, (B, 7), device="cuda")
    tokens = torch.randint(0, 470, (B, 4), device="cuda")
    want, want_state = _run(ref, ref.step, prompt, tokens)
    got, got_state = _run(ref, _fast_fn(fast_step_mod.FastStep(ref)), prompt, tokens)
    assert rel(got, want) < TOL_F32
    assert state_err(got_state, want_state) < TOL_F32


@pytest.mark.parametrize("dtype, tensor_cores", [(torch.float32, False), (torch.bfloat16, True),
                                                  (torch.bfloat16, False)])
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(fast_step_mod, dtype, tensor_cores) -> None:
    """`complete` decodes a sample's candidates, and several samples, as rows of one batch (sample k's candidate c
    at row c * samples + k), and the projections take sequences in groups whose size depends on the batch size (on
    CUDA cores 1, 2, 4 or 8; on tensor cores 1 to 8 tiles of 8, 64 rows a pass): a row must come
    out with the same bits at every batch size and in every slot, or a sample would depend on how many were asked
    for. 72 rows: two passes."""
    model = fast_model(seed=8, d_decay_lora=30, d_aaa_lora=18, d_mv_lora=14, d_gate_lora=31).to(dtype)
    fast = fast_step_mod.FastStep(model, tensor_cores=tensor_cores)
    g = torch.Generator(device="cuda").manual_seed(8)
    prompt = torch.randint(0, 470, (72, 9), device="cuda", generator=g)
    tokens = torch.randint(0, 470, (72, 3), device="cuda", generator=g)
    with torch.no_grad():
        _, start = model(prompt, return_state=True)  # one prefill for every batch below: only the step varies

    def decode(rows: torch.Tensor):
        state = start.index(rows).clone()
        logits = torch.stack([fast(tokens[rows, t], state).clone() for t in range(tokens.shape[1])])
        return logits, state

    everything = torch.arange(72, device="cuda")
    full, full_state = decode(everything)
    shuffled = torch.randperm(72, device="cuda", generator=g)
    for rows in [everything[:n] for n in (1, 2, 3, 5, 8, 9, 17, 33)] + [
            everything[5:6], everything[11:20], everything[60:72], shuffled]:
        logits, state = decode(rows)
        assert torch.equal(logits, full[:, rows]), rows.tolist()
        for part in ("att_x", "wkv", "ffn_x"):
            assert torch.equal(getattr(state, part), getattr(full_state, part)[:, rows]), (part, rows.tolist())


@needs_sm80
@pytest.mark.parametrize("B", [1, 9, 70])
def test_bf16_tensor_core_products_match_the_cuda_core_ones(fast_step_mod, B) -> None:
    """bf16 weights: the tensor-core products (inputs rounded to bf16) against the CUDA-core ones (fp32 inputs), with
    LoRA ranks, a vocabulary and a dim_ffn (8 mod 32: a partial chunk of columns) that leave partial tiles, and 70
    rows (two passes of 64)."""
    model = fast_model(seed=10, vocab=477, dim_ffn=1000, d_decay_lora=30, d_aaa_lora=18, d_mv_lora=14,
                       d_gate_lora=31).to(torch.bfloat16)
    prompt = torch.randint(0, 477, (B, 7), device="cuda")
    tokens = torch.randint(0, 477, (B, 4), device="cuda")
    cores, cores_state = _run(model, _fast_fn(fast_step_mod.FastStep(model, tensor_cores=False)), prompt, tokens)
    tensor, tensor_state = _run(model, _fast_fn(fast_step_mod.FastStep(model)), prompt, tokens)
    assert not torch.equal(tensor, cores)  # the two paths did run
    assert rel(tensor, cores) < 1e-2
    assert state_err(tensor_state, cores_state) < 1e-2


def test_for_model_packs_again_after_the_weights_change(fast_step_mod) -> None:
    model = fast_model(seed=7)
    first = fast_step_mod.FastStep.for_model(model)
    assert fast_step_mod.FastStep.for_model(model) is first
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    second = fast_step_mod.FastStep.for_model(model)
    assert second is not first
    prompt = torch.randint(0, 470, (1, 5), device="cuda")
    tokens = torch.randint(0, 470, (1, 2), device="cuda")
    want, _ = _run(model, model.step, prompt, tokens)
    got, _ = _run(model, _fast_fn(second), prompt, tokens)
    assert rel(got, want) < TOL_F32
    copy.deepcopy(model)  # the cached pack travels with the model (it holds tensors, not the extension module)


def test_out_of_range_token_gives_nan_logits(fast_step_mod) -> None:
    model = fast_model(seed=8)
    fast = fast_step_mod.FastStep(model)
    _, state = model(torch.randint(0, 470, (2, 5), device="cuda"), return_state=True)
    logits = fast(torch.tensor([3, 470], device="cuda"), state)
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()


def test_unsupported_model_falls_back_with_a_warning(fast_step_mod) -> None:
    from rwkv_music.train.complete import fast_step_for

    model = fast_model(seed=9, head_size=32)
    assert "head_size 64" in fast_step_mod.unsupported_reason(model)
    with pytest.warns(UserWarning, match="with the readable model"):
        assert fast_step_for(model) is None


@torch.no_grad()
def test_cuda_graph_replay_equals_eager_calls(fast_step_mod) -> None:
    model = fast_model(seed=3).to(torch.bfloat16)
    fast = fast_step_mod.FastStep(model)
    prompt = torch.randint(0, 470, (2, 17), device="cuda")
    _, state = model(prompt, return_state=True)
    eager_state = state.clone()
    tok = torch.tensor([5, 7], device="cuda")
    eager = [fast(tok, eager_state).clone() for _ in range(4)]

    graph_state = state.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        warm = fast(tok, graph_state.clone())  # warm-up on a copy: the graph's state must start at `state`
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fast(tok, graph_state)
    replayed = []
    for _ in range(4):
        graph.replay()
        replayed.append(out.clone())
    assert torch.equal(warm, eager[0])
    for a, b in zip(replayed, eager, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(graph_state.wkv, eager_state.wkv)


def test_rejects_a_state_in_another_dtype(fast_step_mod) -> None:
    model = fast_model(seed=4).to(torch.bfloat16)
    fast = fast_step_mod.FastStep(model)
    state = RWKV7State.zeros(model.cfg, 1, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        fast(torch.zeros(1, dtype=torch.long, device="cuda"), state)


def _demo_decode():
    """A float32 model on CUDA (the automatic WKV backend) and a real prompt: `generate` bound to both (and to the
    tokenizer, which the default choice among candidates, by consensus, decodes with)."""
    from rwkv_music.remi.grammar import RemiGrammar
    from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score
    from rwkv_music.remi.windows import Vocab, build_prompt
    from rwkv_music.train.complete import generate

    tok = build_tokenizer()
    model = fast_model(seed=5, vocab=len(tok))
    model.wkv_backend = "auto"
    grammar = RemiGrammar(tok)
    ids = encode_piano(load_piano_score(REPO / "examples" / "demo-corpus" / "POP909_010.mid", tok), tok)
    w = build_prompt(ids, Vocab(tok), 4, 2048)
    start = grammar.run(w.tokens, w.meta_len)
    return functools.partial(generate, model, grammar, w.tokens, start, tokenizer=tok)


def test_generate_gives_the_readable_steps_tokens(fast_step_mod) -> None:
    """Whole decode loop (grammar, sampling with complete's defaults, candidates included, CUDA graph) in float32:
    the fused and the readable step pick the same tokens on a real prompt."""
    from rwkv_music.train.sampling import SamplingConfig

    generate = _demo_decode()
    runs = [generate(bars=2, num_samples=3, max_new_tokens=600,
                     sampling=SamplingConfig(), seed=11, cuda_graph=True, fast_step=fast) for fast in (True, False)]
    assert runs[0] == runs[1]
    assert all(len(s) > 0 for s in runs[0])


def test_generate_with_candidates_keeps_the_same_choice_in_every_mode(fast_step_mod) -> None:
    """Candidates under the CUDA graph (fused step) choose what the eager readable decode chooses: the scoring runs
    inside the captured step."""
    from rwkv_music.train.sampling import SamplingConfig

    generate = _demo_decode()
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, candidates=4, choose="likeliest")
    runs = [generate(bars=2, num_samples=3, max_new_tokens=600, sampling=sampling,
                     seed=11, cuda_graph=graph, fast_step=graph) for graph in (True, False)]
    assert runs[0] == runs[1]
    plain = generate(bars=2, num_samples=3, max_new_tokens=600,
                     sampling=dataclasses.replace(sampling, candidates=1), seed=11, cuda_graph=True)
    assert plain != runs[0]  # a candidate other than the plain sample won somewhere: the scores were kept
