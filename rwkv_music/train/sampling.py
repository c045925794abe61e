"""Temperature / top-k / top-p / min-p sampling driven by pre-drawn uniforms, one random stream per sample.

Each sample k draws its uniforms from its own `torch.Generator` seeded with `seed + k`, before decoding starts.
A token is then picked by inverse CDF over the filtered, sorted distribution. So sample k is the same whether it
runs alone or in a batch (its random numbers do not depend on the batch), and the whole step is tensor ops with
no host synchronisation, which a CUDA graph can capture.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_music.train.sampling_config import SamplingConfig

__all__ = ["SamplingConfig", "draw_uniforms", "sample"]


def draw_uniforms(seeds: list[int], steps: int, device: torch.device | str = "cpu") -> Tensor:
    """[len(seeds), steps] float32 uniforms in [0, 1); row k comes only from `seeds[k]`."""
    rows = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    u = torch.stack(rows) if rows else torch.zeros(0, steps, dtype=torch.float64)
    return u.to(torch.float32).clamp_(max=1.0 - 2**-24).to(device)


def sample(logits: Tensor, u: Tensor, cfg: SamplingConfig) -> Tensor:
    """One token per row of `logits` [B, V] (disallowed tokens already -inf), using the uniforms `u` [B].

    Every row must have at least one finite logit.
    """
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    # Each op is a kernel of the decode step's CUDA graph (a few microseconds each), so none is spent on a no-op.
    probs = torch.softmax(logits if cfg.temperature == 1 else logits / cfg.temperature, dim=-1)
    p_sorted, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = None
    if cfg.top_p < 1.0:
        before = p_sorted.cumsum(dim=-1) - p_sorted  # mass of the more likely tokens; the first is always kept
        keep = before < cfg.top_p
    if cfg.min_p > 0.0:  # the cut scales with the model's confidence, unlike top-p's fixed mass
        big = p_sorted >= cfg.min_p * p_sorted[:, :1]
        keep = big if keep is None else keep & big
    kept = p_sorted if keep is None else p_sorted * keep
    if cfg.top_k > 0:
        kept[:, cfg.top_k:] = 0.0  # in place, even on p_sorted: it is not read again
    cdf = kept.cumsum(dim=-1)
    threshold = u[:, None] * cdf[:, -1:]
    j = (cdf <= threshold).sum(dim=-1, keepdim=True)
    # Rounding must never pick a token of zero probability; a row of NaN (a diverged model, a temperature so small
    # that logits / T overflows) keeps none, and gets its first token instead of an index of -1.
    last = (kept > 0).sum(dim=-1, keepdim=True) - 1
    return order.gather(-1, torch.minimum(j, last).clamp_(min=0)).squeeze(-1)
