"""bf16 weights for the forward and backward, fp32 master weights for AdamW (`fit --precision bf16-weights`).

Why: a model whose parameters are bf16 runs every element-wise op and every saved activation in bf16 without
autocast's casts (RWKV-LM trains x070 this way), but AdamW's small updates vanish when added to a bf16 weight
(8 bits of mantissa). So the trainer keeps its usual fp32 model (the masters: what the optimiser steps, what
checkpoints and evaluation see) and a bf16 copy that computes; each step moves the gradients to the masters and
the stepped masters back, rounded to bf16.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class BF16Compute:
    """A bf16 copy of `master` (an fp32 module) and the two transfers between them."""

    def __init__(self, master: nn.Module) -> None:
        self.master = master
        self.model = copy.deepcopy(master).to(torch.bfloat16)
        pairs = list(zip(master.parameters(), self.model.parameters(), strict=True))
        self._masters = [m for m, _ in pairs if m.requires_grad]
        self._computes = [c for m, c in pairs if m.requires_grad]

    def grads_to_master(self) -> None:
        """The bf16 gradients, widened, as the masters' gradients (clipping and AdamW then run in fp32)."""
        for m, c in zip(self._masters, self._computes, strict=True):
            m.grad = None if c.grad is None else c.grad.float()
            c.grad = None

    @torch.no_grad()
    def master_to_compute(self) -> None:
        """After the optimiser step: the masters, rounded to bf16, become the weights the next step computes with."""
        torch._foreach_copy_(self._computes, self._masters)
