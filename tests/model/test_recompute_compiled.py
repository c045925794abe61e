"""Under torch.compile's partitioner, with the CUDA WKV op in the graph (traced through its fake, so on the CPU):
recompute "elementwise" keeps far less for backward, and of the element-wise work only what matrix products read.
Uses bench/saved_activations.py's trace, which stops before anything runs."""

from __future__ import annotations

import pytest

from rwkv_music.model import from_preset

ELEMENTWISE = {"sigmoid", "sub.Tensor", "relu", "pow.Tensor_Scalar", "div.Tensor", "_to_copy", "mul.Tensor", "neg",
               "tanh", "add.Tensor"}


@pytest.fixture(scope="module")
def tracer(bench_module):
    return bench_module("saved_activations")


def test_elementwise_keeps_products_and_kernel_outputs_only(tracer) -> None:
    kept = {mode: tracer.saved_values("tiny", 300, 2, 64, mode, bf16_weights=False, budget=1.0)
            for mode in ("none", "elementwise")}
    size = {mode: sum(n for *_, n in vals) for mode, vals in kept.items()}
    print({mode: sorted({op for op, *_ in vals}) for mode, vals in kept.items()}, size)
    assert size["elementwise"] < 0.6 * size["none"]
    assert any(op.startswith("wkv7_fwd[") for op, *_ in kept["elementwise"])  # the kernel's checkpoints stay
    # element-wise results kept come only from outside the checkpointed blocks (the residual between blocks), but for
    # relu^2, which CPU autocast runs in bf16 (CUDA autocast runs it in fp32, and the policy recomputes it there)
    inside = [(op, src) for op, src, *_ in kept["elementwise"] if op in ELEMENTWISE and "return x + dx" not in src]
    assert {op for op, _ in inside} == {"pow.Tensor_Scalar"}, inside
    assert any(op in ELEMENTWISE for op, *_ in kept["none"])


def test_elementwise_with_bf16_weights_also_keeps_the_products_inputs(tracer) -> None:
    """With bf16 weights "elementwise" keeps the element-wise results that matrix products read (the token-shift
    lerps, relu^2): backward needs them for the weight gradients. No other element-wise result is kept, and relu^2's
    input is not kept beside its output (its derivative comes from the output)."""
    kept = {mode: tracer.saved_values("tiny", 300, 2, 64, mode, bf16_weights=True, budget=1.0)
            for mode in ("none", "elementwise")}
    size = {mode: sum(n for *_, n in vals) for mode, vals in kept.items()}
    print({mode: sorted({op for op, *_ in vals}) for mode, vals in kept.items()}, size)
    assert size["elementwise"] < 0.85 * size["none"]
    ops = [(op, src) for op, src, *_ in kept["elementwise"] if op in ELEMENTWISE | {"addcmul"}]
    inside = [(op, src) for op, src in ops if "return x + dx" not in src]
    assert {op for op, _ in inside} == {"pow.Tensor_Scalar", "addcmul"}, inside
    layers = from_preset("tiny", vocab_size=300).n_layer
    assert sum(op == "addcmul" for op, _ in inside) == 7 * layers  # six lerps in the time mix, one in the channel mix
    assert sum(op == "pow.Tensor_Scalar" for op, _ in inside) == layers  # relu^2
    assert not [src for op, src, *_ in kept["elementwise"] if op == "mm" and "_ReluSquare" in src]  # relu^2's input
