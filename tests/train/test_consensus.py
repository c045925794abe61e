"""Choosing a candidate by consensus: the medoid of the candidates' music metrics, each metric weighed alike."""

from __future__ import annotations

import itertools

import numpy as np

from rwkv_music.train.consensus import consensus_index


def _medoid(feats: list[np.ndarray]) -> int:
    """The same choice written plainly, pair by pair (all metrics defined)."""
    m = len(feats[0])
    pairs = list(itertools.permutations(range(len(feats)), 2))
    scale = [np.mean([abs(feats[i][k] - feats[j][k]) for i, j in pairs]) for k in range(m)]
    total = [sum(abs(feats[i][k] - feats[j][k]) / scale[k] for j in range(len(feats)) if j != i
                 for k in range(m) if scale[k] > 0) for i in range(len(feats))]
    return int(np.argmin(total))


def test_the_candidate_nearest_to_the_others_is_kept():
    rng = np.random.default_rng(0)
    for _ in range(50):
        feats = list(rng.normal(size=(int(rng.integers(3, 9)), 4)) * [1, 10, 100, 0.01])
        assert consensus_index(feats) == _medoid(feats)
    # an outlier is never kept; of two near the centre, the one nearer to the rest
    feats = [np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([30.0, 30.0]), np.array([1.1, 0.9])]
    assert consensus_index(feats) in (1, 3)
    assert consensus_index(feats) == _medoid(feats)


def test_units_do_not_decide():
    """A metric counted in notes (tens) weighs no more than a rate (hundredths): scaling one metric leaves the
    choice alone."""
    rng = np.random.default_rng(1)
    feats = list(rng.normal(size=(7, 3)))
    scaled = [f * [1000.0, 1.0, 0.001] for f in feats]
    assert consensus_index(feats) == consensus_index(scaled)


def test_undecodable_undefined_and_ties():
    a, b, c = np.array([1.0, 2.0]), np.array([1.0, 2.1]), np.array([1.0, 2.2])
    assert consensus_index([None, a, b, c]) == 2  # None is never kept
    assert consensus_index([None, None]) == 0 and consensus_index([None, c]) == 1
    assert consensus_index([a, c]) == 0  # two candidates: no centre, the first (the plain sample) stays
    same = np.array([3.0, 3.0])
    assert consensus_index([same, same.copy(), same.copy()]) == 0  # ties: the lowest index
    # a metric undefined in one candidate (NaN, e.g. the gap between onsets of a one-note bar) sets it apart
    odd = np.array([np.nan, 2.1])
    assert consensus_index([a, odd, b, c]) != 1
