"""What backward recomputes instead of keeping from the forward: the model's `recompute` switch.

- ``none``: keep what the forward made (fastest, most memory).
- ``elementwise``: keep only the outputs of the matrix products and of the WKV kernels (and each block's
  input); every element-wise op, norm and cast between them is run again in backward. Those many [B, T, C]
  intermediates of the token shift, gates and norms (fp32 under autocast) are most of what the forward
  keeps, while running them again is cheap next to the products and the WKV: compiled, the recomputation
  fuses into the backward's own element-wise kernels. This is selective activation checkpointing
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

RECOMPUTE = ("none", "elementwise", "elementwise-relu2", "elementwise-mix", "blocks")

_aten = torch.ops.aten
_PRODUCTS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def _keep_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep matrix products and this package's kernels (the WKV forward ops); recompute the rest."""
    if op in _PRODUCTS or getattr(op, "namespace", None) == "rwkv_music":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_products_and_relu2(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """As `_keep_products`, and keep the channel mix's relu(.)^2 (the input of its value product, [B, T, 4C]) where
    it runs in bf16; under autocast pow runs in fp32, which would double what is kept."""
    if op is _aten.pow.Tensor_Scalar and args[0].dtype != torch.float32:
        return CheckpointPolicy.MUST_SAVE
    return _keep_products(ctx, op, *args, **kwargs)


def _keep_products_relu2_and_mix(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """As `_keep_products_and_relu2`, and keep the token-shift lerps (addcmul), the inputs of the other products."""
    if op is _aten.addcmul.default and args[0].dtype != torch.float32:
        return CheckpointPolicy.MUST_SAVE
    return _keep_products_and_relu2(ctx, op, *args, **kwargs)


def run_block(block: Callable[..., Any], mode: str, *args: Any) -> Any:
    """``block(*args)`` under the recompute mode (a training forward with grad enabled)."""
    if mode == "none":
        return block(*args)
    if mode == "blocks":
        return checkpoint(block, *args, use_reentrant=False)
    if mode == "elementwise":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    if mode == "elementwise-relu2":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products_and_relu2))
    if mode == "elementwise-mix":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products_relu2_and_mix))
    raise ValueError(f"recompute must be one of {RECOMPUTE}, got {mode!r}")
