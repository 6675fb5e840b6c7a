"""Random streams, one per subsystem, all derived from one seed.

Each stream is keyed by names (``("arrivals", "embed-{i:03d}")``), not by the
order in which streams are asked for, so two plans of the same fleet draw the
same arrivals, request sizes and service times (common random numbers) even
when they have different endpoints.
"""
from __future__ import annotations

import zlib

import numpy as np


def _key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class Streams:
    """Independent ``numpy.random.Generator`` streams keyed by subsystem and name."""

    def __init__(self, seed: int, replication: int = 0):
        self.seed = int(seed)
        self.replication = int(replication)

    def get(self, subsystem: str, name: str = "") -> np.random.Generator:
        ss = np.random.SeedSequence(self.seed, spawn_key=(self.replication, _key(subsystem), _key(name)))
        return np.random.Generator(np.random.PCG64(ss))
