"""Under torch.compile's partitioner, with the CUDA WKV op in the graph (traced through its fake, so on the CPU):
recompute "elementwise" keeps far less for backward, and none of it element-wise work. Uses
bench/saved_activations.py's trace, which stops before anything runs."""

from __future__ import annotations

import pytest

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
    # element-wise results kept come only from outside the checkpointed blocks (the residual between blocks)
    inside = [(op, src) for op, src, *_ in kept["elementwise"] if op in ELEMENTWISE and "return x + dx" not in src]
    assert inside == []
    assert any(op in ELEMENTWISE for op, *_ in kept["none"])
