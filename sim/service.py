"""Service-time models: the time one request takes on one copy of its model.

Parametric (a distribution by mean and coefficient of variation) or token-based
(``base + per_input_token * input + per_output_token * output``, times a noise
factor of mean 1 and the given cv). All sampling is vectorised.
"""
from __future__ import annotations

import numpy as np

from .scenario.schema import Distribution, ServiceSpec


def sample(rng: np.random.Generator, dist: str, mean: float | np.ndarray, cv: float, n: int,
           samples: tuple[float, ...] | None = None) -> np.ndarray:
    """``n`` positive draws with the given mean and coefficient of variation (``empirical``: the
    ``samples`` drawn with replacement, scaled to the mean)."""
    if n == 0:
        return np.empty(0)
    if dist == "empirical":
        s = np.asarray(samples, dtype=float)
        return rng.choice(s, n) * (mean / s.mean())
    if dist == "deterministic" or cv == 0:
        return np.broadcast_to(np.asarray(mean, dtype=float), (n,)).copy()
    if dist == "exponential":
        return rng.exponential(1.0, n) * mean
    if dist == "lognormal":
        s2 = np.log1p(cv * cv)
        return rng.lognormal(-s2 / 2.0, np.sqrt(s2), n) * mean
    if dist == "gamma":
        k = 1.0 / (cv * cv)
        return rng.gamma(k, 1.0 / k, n) * mean
    raise ValueError(f"unknown distribution {dist!r}")


def sample_tokens(rng: np.random.Generator, spec: int | Distribution, n: int) -> np.ndarray:
    if isinstance(spec, int):
        return np.full(n, spec, dtype=np.int64)
    cv = spec.cv if spec.cv is not None else (1.0 if spec.dist == "exponential" else 0.0)
    return np.maximum(np.rint(sample(rng, spec.dist, spec.mean, cv, n)), 0).astype(np.int64)


def service_times(rng: np.random.Generator, spec: ServiceSpec, input_tokens: np.ndarray | None,
                  output_tokens: np.ndarray | None, n: int) -> np.ndarray:
    """Service times in seconds for ``n`` requests of one model group."""
    cv = spec.effective_cv
    if not spec.token_based:
        return sample(rng, spec.effective_dist, spec.mean, cv, n, spec.samples)
    base = np.full(n, spec.base or 0.0)
    if spec.per_input_token and input_tokens is not None:
        base = base + spec.per_input_token * input_tokens
    if spec.per_output_token and output_tokens is not None:
        base = base + spec.per_output_token * output_tokens
    if cv == 0:
        return base
    return base * sample(rng, spec.effective_dist, 1.0, cv, n, spec.samples)
