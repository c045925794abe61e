"""Near-duplicate detection across the whole corpus: equal note content, optionally MinHash-close note n-grams.

Workers compute a piece's fingerprints (`note_content_hash`, `minhash_signature`); the driver decides, in sorted
path order, which piece of each group is kept, so the choice does not depend on scheduling.
"""

from __future__ import annotations

import numpy as np

NUM_PERM = 64  # MinHash permutations (signature length)
NGRAM = 4  # notes per shingle
_MINHASH_SEED = 1


def _scheme() -> dict:
    """datasketch >= 2.0 names its hashing scheme (and needs it to rebuild a MinHash from stored values)."""
    import datasketch

    return {"scheme": "affine32"} if int(datasketch.__version__.split(".")[0]) >= 2 else {}


def minhash_signature(notes: np.ndarray) -> list[int]:
    """MinHash of the piece's note 4-grams, each note as (onset step since the previous note, duration, pitch).

    Relative onsets make the shingles independent of where the piece starts; absolute pitch keeps transposed
    versions (distinct pieces for training) apart.
    """
    from datasketch import MinHash

    d = np.array(notes, dtype=np.int64, copy=True)
    if len(d):
        d[1:, 0] = np.diff(d[:, 0])
        d[0, 0] = 0
    k = min(NGRAM, max(1, len(d)))
    shingles = [d[i:i + k].tobytes() for i in range(max(1, len(d) - k + 1))]
    m = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, **_scheme())
    m.update_batch(shingles)
    return [int(v) for v in m.hashvalues]


def find_near_duplicates(pieces: list[dict], mode: str, threshold: float = 0.9) -> dict[str, str]:
    """{source: source of the kept piece} for every piece that duplicates an earlier one (sorted by source).

    `pieces` are dicts with "source", "content" and, for mode "minhash", "minhash". Mode "off" finds nothing.
    """
    if mode == "off":
        return {}
    ordered = sorted(pieces, key=lambda p: p["source"])
    first: dict[str, str] = {}
    dup: dict[str, str] = {}
    kept = []
    for p in ordered:
        same = first.setdefault(p["content"], p["source"])
        if same != p["source"]:
            dup[p["source"]] = same
        else:
            kept.append(p)
    if mode == "minhash":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        signatures: dict[str, np.ndarray] = {}
        for p in kept:
            if not p.get("minhash"):
                continue
            sig = np.asarray(p["minhash"], dtype=np.uint64)
            m = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, hashvalues=sig, **_scheme())
            # LSH candidates are only probably close: confirm with the estimated Jaccard similarity.
            close = sorted(c for c in lsh.query(m) if float(np.mean(signatures[c] == sig)) >= threshold)
            if close:
                dup[p["source"]] = close[0]
            else:
                lsh.insert(p["source"], m)
                signatures[p["source"]] = sig
    return dup
