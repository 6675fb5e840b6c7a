"""Loading a model onto an instance: a pipeline of stages on shared links.

A cold start is download (when the artifact is not on the instance's disk),
disk -> host read, host -> GPU copy and a runtime init. The first three run
on per-instance links whose bandwidth concurrent loads share equally
(processor sharing, as a fluid); init is a plain delay, or, for a load onto
an instance's CPUs, a job on the device its requests share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.engine import Call, Engine

class SharedLink:
    """A link of ``bandwidth`` GB/s shared equally by the transfers on it."""

    __slots__ = ("engine", "bandwidth", "active", "_last", "_version", "_cbs")

    def __init__(self, engine: Engine, bandwidth_gbs: float):
        self.engine = engine
        self.bandwidth = bandwidth_gbs
        self.active: dict[int, list] = {}  # id -> [remaining GB, on_done]
        self._last = 0.0
        self._version = 0
        self._cbs = [self._fire]

    def transfer(self, size_gb: float, on_done: Callable[[], None]) -> None:
        """Move ``size_gb`` over the link, then call ``on_done()``."""
        if size_gb <= 0 or self.bandwidth == float("inf"):
            on_done()
            return
        self._advance()
        self.active[id(on_done)] = [size_gb, on_done]
        self._reschedule()

    def _advance(self) -> None:
        now = self.engine.env._now
        k = len(self.active)
        if k:
            moved = (now - self._last) * self.bandwidth / k
            for entry in self.active.values():
                entry[0] -= moved
        self._last = now

    def _reschedule(self) -> None:
        self._version += 1
        if not self.active:
            return
        k = len(self.active)
        rem = min(e[0] for e in self.active.values())
        self.engine.at(max(rem, 0.0) * k / self.bandwidth, self._fire, self._version)

    def _fire(self, call: Call) -> None:
        if call.arg != self._version:
            return  # superseded by a later start or finish
        self._advance()
        # The transfer this call was scheduled for is done, whatever float residue
        # is left; so is any other within a relative hair of it.
        rem = min(e[0] for e in self.active.values())
        tol = max(abs(rem), 1e-9) * 1e-6 + 1e-12
        done = [key for key, e in self.active.items() if e[0] <= rem + tol]
        finished = [self.active.pop(key)[1] for key in done]
        self._reschedule()
        for cb in finished:
            cb()


@dataclass
class LoadRecord:
    """One model load, for the CloudWatch-style metrics."""

    instance: int
    model: int
    queued: float           # when the load was asked for
    start: float = -1.0     # when it got a load slot and memory
    downloaded: float = -1.0
    end: float = -1.0       # when the model could serve
    download_s: float = 0.0


@dataclass(frozen=True)
class LoadSpeeds:
    """Bandwidths (GB/s) of an instance's load path, and a fixed time (s) every load adds."""

    download_gbs: float
    disk_gbs: float
    h2d_gbs: float
    init_s: float


class Loader:
    """The load pipeline of one instance: download -> disk read -> host to GPU -> init."""

    def __init__(self, engine: Engine, speeds: LoadSpeeds):
        self.engine = engine
        self.speeds = speeds
        self.net = SharedLink(engine, speeds.download_gbs)
        self.disk = SharedLink(engine, speeds.disk_gbs)
        self.pcie = SharedLink(engine, speeds.h2d_gbs)

    def load(self, size_gb: float, on_disk: bool, init_s: float, rec: LoadRecord,
             on_done: Callable[[], None], to_gpu: bool = True, init_on: Any = None, model: int | None = None) -> None:
        """Load a model of ``size_gb``, then call ``on_done()``. ``init_on``: the device whose cores run
        the init (a load onto an instance's CPUs: :meth:`~sim.hosting.device.Device.job`, a share of them
        beside the requests there; ``model``: the model loaded), else the init is a plain delay."""
        env = self.engine.env
        init_s += self.speeds.init_s

        def after_init(call=None):
            rec.end = env._now
            on_done()

        def after_h2d():
            if init_s <= 0:
                after_init()
            elif init_on is not None:
                init_on.job(init_s, after_init, model)
            else:
                self.engine.at(init_s, after_init)

        def after_read():
            if to_gpu:
                self.pcie.transfer(size_gb, after_h2d)
            else:
                after_h2d()

        def after_download():
            rec.downloaded = env._now
            rec.download_s = rec.downloaded - rec.start
            self.disk.transfer(size_gb, after_read)

        if on_disk:
            after_download()
        else:
            self.net.transfer(size_gb, after_download)

    def cold_start_estimate(self, size_gb: float, on_disk: bool, init_s: float, to_gpu: bool = True) -> float:
        """The time of one load alone on the instance (the sum of its stages)."""
        s = self.speeds
        t = 0.0 if on_disk else size_gb / s.download_gbs
        return t + size_gb / s.disk_gbs + (size_gb / s.h2d_gbs if to_gpu else 0.0) + init_s + s.init_s
