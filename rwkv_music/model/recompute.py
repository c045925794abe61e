"""What backward recomputes instead of keeping from the forward: the model's `recompute` switch.

- ``none``: keep what the forward made (fastest, most memory).
- ``elementwise``: keep only the outputs of the matrix products and of the WKV kernels (and each block's
  input); every element-wise op, norm and cast between them is run again in backward. Those many [B, T, C]
  intermediates of the token shift, gates and norms (fp32 under autocast) are most of what the forward
  keeps, while running them again is cheap next to the products and the WKV: compiled, the recomputation
  fuses into the backward's own element-wise kernels. This is selective activation checkpointing
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) with a policy by op; docs/benchmarks.md
  has what it saves and costs.
- ``arithmetic``: like ``elementwise``, but the results of the costlier element-wise ops (sigmoid, tanh, the
  L2 and group/layer norms, exp) are kept too; only sums, products, differences, relu, powers, shifts and casts
  run again. Those cheap ones are most of the bytes (the six token-shift lerps, the channel mix's relu and its
  square) while the kept ones spare backward the longer chains.
- ``blocks``: keep only each block's input and run the whole block again in backward (least memory; the
  matrix products and the WKV forward run twice).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE = ("none", "elementwise", "arithmetic", "blocks")

_aten = torch.ops.aten
_PRODUCTS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def _keep_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep matrix products and this package's kernels (the WKV forward ops); recompute the rest."""
    if op in _PRODUCTS or getattr(op, "namespace", None) == "rwkv_music":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# recomputed under "arithmetic": one fused pass of arithmetic each, cheap to run again in backward
_ARITHMETIC = {_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.neg.default, _aten.relu.default,
               _aten.pow.Tensor_Scalar, _aten.cat.default, _aten.masked_fill.Scalar, _aten.zeros_like.default,
               _aten._to_copy.default, _aten.clone.default, _aten.rsub.Scalar, _aten.add.Scalar, _aten.mul.Scalar,
               _aten.sub.Scalar}


def _keep_all_but_arithmetic(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Recompute only cheap arithmetic; keep products, kernels, norms and transcendental gates."""
    if op in _ARITHMETIC:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def run_block(block: Callable[..., Any], mode: str, *args: Any) -> Any:
    """``block(*args)`` under the recompute mode (a training forward with grad enabled)."""
    if mode == "none":
        return block(*args)
    if mode == "blocks":
        return checkpoint(block, *args, use_reentrant=False)
    if mode == "elementwise":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    if mode == "arithmetic":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_all_but_arithmetic))
    raise ValueError(f"recompute must be one of {RECOMPUTE}, got {mode!r}")
