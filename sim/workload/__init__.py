"""Workload generation: arrival processes, popularity and trace replay.

All generators are pure numpy functions that take a ``numpy.random.Generator``
explicitly and keep no global state.
"""
from sim.workload.arrivals import (
    cumulative_intensity,
    diurnal_arrivals,
    gamma_arrivals,
    mmpp_on_off_arrivals,
    poisson_arrivals,
    rate_function,
)
from sim.workload.popularity import assign, zipf_weights
from sim.workload.traces import FORMATS, TraceError, read_trace, trace_arrivals

__all__ = [
    "poisson_arrivals",
    "gamma_arrivals",
    "diurnal_arrivals",
    "mmpp_on_off_arrivals",
    "rate_function",
    "cumulative_intensity",
    "zipf_weights",
    "assign",
    "TraceError",
    "FORMATS",
    "read_trace",
    "trace_arrivals",
]
