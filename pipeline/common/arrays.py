"""Array helpers both stages use: row normalisation, reproducible subsets, finiteness checks."""

from __future__ import annotations

import numpy as np

from featcache.cache.errors import FeatcacheError


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def require_finite(x: np.ndarray, store, layer: str) -> np.ndarray:
    """``x`` (features of ``layer`` read from ``store``, missing rows left out), refused if any
    value is NaN or infinite: a damaged store never trains or scores in silence."""
    if not all(np.isfinite(x[s:s + 8192]).all() for s in range(0, len(x), 8192)):  # no n x d float32 copy or mask
        raise FeatcacheError(f"layer {layer} of {store.path} holds non-finite values in rows not marked missing",
                             f"run: featcache verify {store.path}")
    return x


def subsample(n: int, size: int | None, seed: int) -> np.ndarray:
    """A reproducible random subset of ``size`` of ``n`` rows (all rows, in order, if None).

    Nested across sizes: a prefix of one seeded permutation, so for a seed the 100 rows
    contain the 50 (a data-scaling series adds pairs, it never redraws them).
    """
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])
