"""torch.compile for training this model, with the two compiler settings it needs.

- AOTAutograd's on-disk cache off: saving a lazily compiled backward to it crashed the process now and
  then (SIGSEGV while pickling it, pytorch/pytorch#177442; torch 2.13 on CPU: 3 of 9 cold-cache compiles).
  Inductor's own cache of compiled kernels stays on, so a second start is still fast.
- Inductor's mix-order reductions off: fusing the parameter-gradient reductions over (B, T) with the row
  reductions of the norms returned [C] where the [1, 1, C] mixing parameters need [1, 1, C] (torch 2.11 on
  an H200: "CompiledFunctionBackward returned an invalid gradient ... got [768]"), and the same code path
  is known to compute silently wrong gradients (pytorch/pytorch#193061, regression in 2.10).
Both are process-wide torch settings: they apply to every model compiled afterwards in the process.

`memory_budget` (0..1, None = torch's default of 1) is AOTAutograd's activation memory budget: below 1 the
partitioner recomputes cheap element-wise activations in backward instead of saving them. It is process-wide
and read when the model first runs, so each call sets it (None: back to 1).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_for_training(model: nn.Module, memory_budget: float | None = None, **kwargs) -> nn.Module:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    functorch_config.enable_autograd_cache = False
    if hasattr(inductor_config, "triton") and hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False
    if memory_budget is not None and not 0.0 <= memory_budget <= 1.0:
        raise ValueError(f"memory_budget must be in [0, 1], got {memory_budget}")
    # always set: an earlier call's budget must not carry over to this model
    functorch_config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
    return torch.compile(model, **kwargs)
