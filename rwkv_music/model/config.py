"""Hyper-parameters of an RWKV-7 (x070) model and the named presets.

The LoRA ranks follow RWKV-LM's current x070 training code (RWKV-v7/train_temp/src/model.py):
``max(32, round(f * sqrt(C) / 32) * 32)`` with f = 2.5 (decay w), 2.5 (in-context rate a), 1.7 (value
residual v) and 5 (gate g), all with exponent 0.5. (Older RWKV-LM revisions used 1.8 / 1.8 / 1.3 and
``0.6 * C**0.8`` for the gate; checkpoints made that way still load because `load_rwkv_lm` reads the ranks
from the tensor shapes.) Python's ``round`` (half to even) is used, as in RWKV-LM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


def lora_rank(n_embd: int, factor: float, exponent: float = 0.5) -> int:
    """RWKV-LM's suggested LoRA rank: a multiple of 32, at least 32."""
    return max(32, int(round(factor * (n_embd**exponent) / 32) * 32))


@dataclass
class RWKV7Config:
    """Shape of an RWKV-7 model. Fields left at None are derived from ``n_embd`` in ``__post_init__``."""

    vocab_size: int
    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 64
    dim_ffn: int | None = None  # channel-mix hidden size; RWKV-LM x070 uses 4 * n_embd
    d_decay_lora: int | None = None  # rank of w1/w2
    d_aaa_lora: int | None = None  # rank of a1/a2
    d_mv_lora: int | None = None  # rank of v1/v2 (value residual)
    d_gate_lora: int | None = None  # rank of g1/g2

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.n_layer < 1:
            raise ValueError(f"vocab_size and n_layer must be positive, got {self.vocab_size}, {self.n_layer}")
        if self.n_embd % self.head_size != 0:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}")
        C = self.n_embd
        if self.dim_ffn is None:
            self.dim_ffn = 4 * C
        if self.d_decay_lora is None:
            self.d_decay_lora = lora_rank(C, 2.5)
        if self.d_aaa_lora is None:
            self.d_aaa_lora = lora_rank(C, 2.5)
        if self.d_mv_lora is None:
            self.d_mv_lora = lora_rank(C, 1.7)
        if self.d_gate_lora is None:
            self.d_gate_lora = lora_rank(C, 5.0)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RWKV7Config:
        """Build from a dict, ignoring unknown keys (so newer config files stay loadable)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_params(self) -> int:
        """Parameter count of the model this config describes (without RWKV-LM's unused layer-0 v0/v1/v2)."""
        C, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.dim_ffn
        lora = 2 * C * (self.d_decay_lora + self.d_aaa_lora + self.d_gate_lora)
        per_layer = (
            4 * C * C  # r, k, v, output
            + lora
            + 6 * C  # x_r .. x_g
            + 2 * C  # w0, a0
            + 2 * C  # k_k, k_a
            + C  # r_k
            + 2 * C  # ln_x
            + 2 * C * F  # ffn key, value
            + C  # ffn x_k
            + 4 * C  # ln1, ln2
        )
        vres = (L - 1) * (2 * C * self.d_mv_lora + C)
        return L * per_layer + vres + 2 * C + 2 * V * C + 2 * C  # + ln0, emb, head, ln_out


# name -> (n_layer, n_embd)
PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (4, 128),
    "small": (6, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


def from_preset(name: str, vocab_size: int, **overrides: Any) -> RWKV7Config:
    """Config of a named preset (tiny, small, base, large); keyword overrides win."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    n_layer, n_embd = PRESETS[name]
    kw: dict[str, Any] = {"n_layer": n_layer, "n_embd": n_embd, **overrides}
    return RWKV7Config(vocab_size=vocab_size, **kw)

