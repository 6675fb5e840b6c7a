"""How a group's traffic splits over its models (pure numpy)."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["zipf_weights", "assign"]


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Zipf popularity: ``p_k ∝ 1/k**s`` for ``k = 1..n``, summing to 1.

    ``s = 0`` gives the uniform distribution; larger ``s`` concentrates the
    traffic on the first models (``p_1/p_2 = 2**s``).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    s = float(s)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"zipf exponent s must be a finite number >= 0, got {s!r}")
    k = np.arange(1, int(n) + 1, dtype=np.float64)
    logw = -s * np.log(k)  # computed in log space: no overflow/underflow surprises
    w = np.exp(logw - logw.max())
    return w / w.sum()


def assign(rng: np.random.Generator, n_requests: int, weights) -> np.ndarray:
    """Draw ``n_requests`` indices in ``[0, len(weights))`` with probabilities ∝ ``weights``.

    ``weights`` need not sum to 1 (they are normalised) but must be finite,
    non-negative and not all zero. An index with weight 0 is never drawn.
    Returns an int32 array.
    """
    n_requests = int(n_requests)
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size == 0:
        raise ValueError("weights must not be empty")
    if w.size > np.iinfo(np.int32).max:
        raise ValueError("too many weights for int32 indices")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    cdf = np.cumsum(w)
    total = cdf[-1]
    if total <= 0:
        raise ValueError("weights must not all be zero")
    if w.size == 1:
        return np.zeros(n_requests, dtype=np.int32)
    cdf /= total
    idx = np.searchsorted(cdf, rng.random(n_requests), side="right")
    # rounding in the cumsum could push a draw past the last positive weight
    last_positive = int(np.flatnonzero(w > 0)[-1])
    np.minimum(idx, last_positive, out=idx)
    return idx.astype(np.int32, copy=False)
