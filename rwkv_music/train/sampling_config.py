"""The sampling settings of `complete` and `eval`, kept free of torch so that the CLIs can show their defaults
without importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_CANDIDATES = 64  # each candidate is a decoded row: the batch grows with it
CHOICES = ("likeliest", "consensus")  # how one of several candidates is kept


@dataclass(frozen=True)
class SamplingConfig:
    # 0 means greedy. 1.0: with 16 candidates kept by consensus, the dev sweep of a GPU-trained model (H100,
    # 2026-12-07, one seed) put 1.0 before 1.15 and 0.85, and a CPU-trained one's put 1.0 before 0.85 and 0.7
    # (docs/results.md): more varied draws give the consensus more to choose from
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    min_p: float = 0.0  # keep tokens at least this fraction of the most likely one's probability; 0 = off
    # draw this many continuations per sample and keep one of them (see `choose`); 1 = off. The default: on
    # the music21 build's dev pieces, 16 candidates kept by consensus were closer to the truth than plain samples on
    # most of eval's metrics, on a GPU-trained model and a CPU one (docs/results.md)
    candidates: int = 16
    # which candidate is kept: "consensus", the one whose music metrics are nearest to the other candidates'
    # (train/consensus.py: the most typical of the model's draws); "likeliest", the one the model itself finds
    # likeliest (mean log-probability of the tokens chosen where the grammar left a choice, at temperature 1)
    choose: str = "consensus"

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be in 1 .. {MAX_CANDIDATES}, got {self.candidates}")
        if self.choose not in CHOICES:
            raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {self.choose!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, top-k 1 or min-p 1: one continuation per prompt, whatever the seed."""
        return self.temperature == 0 or self.top_k == 1 or self.min_p == 1.0

    @property
    def drawn(self) -> int:
        """Candidates decoded per sample: `candidates`, or 1 where decoding is greedy (every candidate would be the
        same continuation)."""
        return 1 if self.greedy else self.candidates
