"""Recurrent state of an RWKV-7 model: what the RNN carries from one token to the next.

Per layer: the time-mix input of the previous token (``att_x``, for token shift), the WKV matrix
state (``wkv``, always float32) and the channel-mix input of the previous token (``ffn_x``).
Layers are stacked along dim 0 so the whole state is three tensors: cheap to index by batch row,
expand, copy into static buffers (CUDA graphs) and move between devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rwkv_music.model.config import RWKV7Config


@dataclass
class RWKV7State:
    att_x: Tensor  # [n_layer, B, C]           ln1 output of the previous token
    wkv: Tensor  # [n_layer, B, H, N, N] fp32   S[i, j]: i value index, j key index
    ffn_x: Tensor  # [n_layer, B, C]           ln2 output of the previous token

    @classmethod
    def zeros(
        cls,
        cfg: RWKV7Config,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RWKV7State:
        """The state before any token (what forward uses when state=None)."""
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(
            att_x=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
            ffn_x=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.att_x.shape[1]

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.wkv.device

    def index(self, rows: Tensor | slice | list[int] | int) -> RWKV7State:
        """The state of a subset of batch rows (e.g. the samples still generating)."""
        if isinstance(rows, int):
            rows = [rows]
        return RWKV7State(self.att_x[:, rows], self.wkv[:, rows], self.ffn_x[:, rows])

    def expand(self, batch_size: int) -> RWKV7State:
        """Repeat a batch-1 state to ``batch_size`` rows (one prompt, many samples). Returns copies."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a state of batch 1, got batch {self.batch_size}")
        return RWKV7State(
            self.att_x.repeat(1, batch_size, 1),
            self.wkv.repeat(1, batch_size, 1, 1, 1),
            self.ffn_x.repeat(1, batch_size, 1),
        )

    def repeat_interleave(self, repeats: int) -> RWKV7State:
        """Each row repeated ``repeats`` times in place: rows [s0, s0, s1, s1, ...]."""
        return RWKV7State(
            self.att_x.repeat_interleave(repeats, dim=1),
            self.wkv.repeat_interleave(repeats, dim=1),
            self.ffn_x.repeat_interleave(repeats, dim=1),
        )

    def detach(self) -> RWKV7State:
        return RWKV7State(self.att_x.detach(), self.wkv.detach(), self.ffn_x.detach())

    def clone(self) -> RWKV7State:
        return RWKV7State(self.att_x.clone(), self.wkv.clone(), self.ffn_x.clone())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RWKV7State:
        """Move to a device; ``dtype`` applies to att_x/ffn_x only (the WKV state stays float32)."""
        return RWKV7State(
            self.att_x.to(device=device, dtype=dtype),
            self.wkv.to(device=device),
            self.ffn_x.to(device=device, dtype=dtype),
        )

    def copy_(self, other: RWKV7State) -> RWKV7State:
        """In-place copy (keeps this object's storage: static buffers for CUDA graphs)."""
        self.att_x.copy_(other.att_x)
        self.wkv.copy_(other.wkv)
        self.ffn_x.copy_(other.ffn_x)
        return self

    @classmethod
    def cat(cls, states: list[RWKV7State]) -> RWKV7State:
        """Concatenate states along the batch dimension."""
        return cls(
            torch.cat([s.att_x for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
            torch.cat([s.ffn_x for s in states], dim=1),
        )
