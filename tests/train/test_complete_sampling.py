"""Sampling by inverse CDF over pre-drawn per-sample uniforms."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_music.train.sampling import SamplingConfig, draw_uniforms, sample


def _grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def test_frequencies_follow_the_distribution():
    """With evenly spread uniforms, each token is picked in proportion to its probability."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    n = 4096
    toks = sample(logits.expand(n, -1), _grid(n), SamplingConfig(temperature=1.0, top_p=1.0))
    freq = torch.bincount(toks, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.125, 0.125]), atol=2e-3, rtol=0)


def test_masked_tokens_are_never_picked_even_at_high_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 50, generator=g) * 10
    allowed = torch.rand(512, 50, generator=g) < 0.1
    allowed[:, 7] = True
    u = torch.rand(512, generator=g)
    u[:8] = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 0.999999, 1e-9, 0.25, 0.75, 0.9999])
    for cfg in (SamplingConfig(5.0, 0, 1.0), SamplingConfig(0.3, 5, 0.5), SamplingConfig(100.0, 0, 1.0)):
        toks = sample(logits.masked_fill(~allowed, -math.inf), u, cfg)
        assert allowed[torch.arange(512), toks].all()


def test_rows_without_a_probability_give_a_token_instead_of_an_error():
    """NaN probabilities (a diverged model's logits, or a temperature so small that logits / T overflows) keep no
    token; the sampler must still return an index in range (on CUDA an index of -1 is a device assert mid-decode)."""
    u = torch.tensor([0.3, 0.9, 0.5])
    logits = torch.tensor([[float("-inf")] * 4, [float("nan")] * 4, [1.0, 2.0, 3.0, 4.0]])
    for cfg in (SamplingConfig(), SamplingConfig(top_p=1.0, top_k=2), SamplingConfig(temperature=1e-40, min_p=0.1)):
        tok = sample(logits, u, cfg)
        assert tok.shape == (3,) and bool(((tok >= 0) & (tok < 4)).all()), (cfg, tok)


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 1000
    u = _grid(n)
    k2 = sample(logits.expand(n, -1), u, SamplingConfig(1.0, top_k=2, top_p=1.0))
    assert set(k2.tolist()) == {0, 1}
    p = sample(logits.expand(n, -1), u, SamplingConfig(1.0, top_k=0, top_p=0.65))  # 0.4 + 0.3 reaches it
    assert set(p.tolist()) == {0, 1}
    assert sample(logits[None], torch.tensor([0.99]), SamplingConfig(1.0, 0, 0.01)).item() == 0
    assert sample(logits[None], torch.tensor([0.99]), SamplingConfig(0.0)).item() == 0  # greedy


def test_min_p_cut_scales_with_the_top_token():
    """min-p keeps the tokens at least min_p times as likely as the most likely one, after temperature."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    u = _grid(1000)
    pick = lambda cfg: set(sample(logits.expand(1000, -1), u, cfg).tolist())  # noqa: E731
    assert pick(SamplingConfig(1.0, top_p=1.0, min_p=0.35)) == {0, 1}  # cut at 0.175
    assert pick(SamplingConfig(1.0, top_p=1.0, min_p=0.25)) == {0, 1, 2}  # cut at 0.125
    assert pick(SamplingConfig(1.0, top_p=1.0, min_p=1.0)) == {0}
    assert pick(SamplingConfig(1.0, top_p=1.0, min_p=0.0)) == {0, 1, 2, 3}
    # a flatter distribution (temperature 3) lets more tokens over the same relative cut
    assert pick(SamplingConfig(3.0, top_p=1.0, min_p=0.35)) == {0, 1, 2, 3}
    # combined with top-p, both filters apply
    assert pick(SamplingConfig(1.0, top_p=0.6, min_p=0.1)) == {0, 1}


def test_uniforms_depend_only_on_each_seed():
    a = draw_uniforms([7, 8, 9, 10], 50)
    singles = torch.cat([draw_uniforms([s], 50) for s in (7, 8, 9, 10)])
    assert torch.equal(a, singles)
    assert not torch.equal(a[0], a[1])
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=-0.1), dict(min_p=1.5)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
