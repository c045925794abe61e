"""What backward recomputes instead of keeping from the forward: the model's `recompute` switch.

- ``none``: keep what the forward made (fastest, most memory).
- ``elementwise``: keep only the outputs of the matrix products and of the WKV kernels (and each block's
  input) and, where they are bf16 (bf16 weights; CUDA autocast runs them in fp32, and then they are
  recomputed), the products' element-wise inputs: the token-shift lerps and relu^2, which backward reads for
  the weight gradients and would otherwise make and write out again. Every other element-wise op, norm and
  cast is run again in backward. Those many [B, T, C] intermediates of the gates
  and norms (fp32 under autocast) are most of what the forward keeps, while running them again is cheap next
  to the products and the WKV: compiled, the recomputation fuses into the backward's own element-wise
  kernels. This is selective activation checkpointing
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) with a policy by op; docs/benchmarks.md
  has what it saves and costs.
- ``blocks``: keep only each block's input and run the whole block again in backward (least memory; the
  matrix products and the WKV forward run twice).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE = ("none", "elementwise", "blocks")

_aten = torch.ops.aten
_PRODUCTS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
# The products' inputs that are element-wise results: relu(.)^2 before the channel mix's value product, and the
# token-shift lerps (x + xx * mix, written as addcmul) before the others.
_PRODUCT_INPUTS = {_aten.pow.Tensor_Scalar, _aten.addcmul.default}


def _keep_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the matrix products' outputs, this package's kernels' (the WKV forward ops) and the products' element-wise
    inputs where they are bf16; recompute the rest. With fp32 weights under CUDA autocast those inputs run in fp32
    (twice the bytes) and are recomputed too; the test is the tensor's dtype, not the weights'."""
    if op in _PRODUCTS or getattr(op, "namespace", None) == "rwkv_music":
        return CheckpointPolicy.MUST_SAVE
    if op in _PRODUCT_INPUTS and args[0].dtype != torch.float32:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block: Callable[..., Any], mode: str, *args: Any) -> Any:
    """``block(*args)`` under the recompute mode (a training forward with grad enabled)."""
    if mode == "none":
        return block(*args)
    if mode == "blocks":
        return checkpoint(block, *args, use_reentrant=False)
    if mode == "elementwise":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    raise ValueError(f"recompute must be one of {RECOMPUTE}, got {mode!r}")
