"""The event core: SimPy's calendar, requests as rows of preallocated columns.

A request is an index ``i`` into the columns of :class:`Requests`. It costs
one calendar entry, its completion: the open-loop arrivals, pre-generated in
time order, are merged into the run's loop from the table (a cursor walks them),
in the order SimPy's heap would give them. Its start happens inside its arrival
or a completion. Long-lived actors (autoscalers, failure injectors, samplers) may be
ordinary SimPy processes on the same environment.
"""
from __future__ import annotations

import gc
import math
from array import array
from heapq import heappop, heappush
from typing import Callable

import numpy as np
import simpy
from simpy.core import NORMAL, URGENT, EmptySchedule, StopSimulation

# Request status codes (the ``status`` column); STATUS_NAMES maps them to the
# strings of requests.parquet.
IN_FLIGHT, OK, TIMEOUT, THROTTLED, NO_CAPACITY, INSTANCE_FAILURE = range(6)
STATUS_NAMES = ("in_flight", "ok", "timeout", "throttled", "no_capacity", "instance_failure")


class Call:
    """A bare calendar entry. SimPy's ``step()`` pops it and calls its callbacks.

    It has only what ``step()`` reads (``callbacks`` and ``_ok``), which makes
    it several times cheaper than a ``simpy.Event`` to create and schedule.
    """

    __slots__ = ("callbacks", "arg", "obj")
    _ok = True

    def __init__(self, callbacks: list, arg: object = None, obj: object = None):
        self.callbacks = callbacks
        self.arg = arg
        self.obj = obj


class Requests:
    """Columns of the request table. Python lists while running (cheap to index
    and assign one element at a time); numpy arrays once finished."""

    def __init__(self, arrival: np.ndarray, model: np.ndarray, service: np.ndarray,
                 input_tokens: np.ndarray, output_tokens: np.ndarray, route_u: np.ndarray):
        n = len(arrival)
        self.n_open = n
        self._open = (arrival, model)   # as given: to_arrays returns them where nothing changed
        self.arrival: list[float] = arrival.tolist()
        self.model: list[int] = model.tolist()
        self.service: list[float] = service.tolist()
        # Tokens are not read while simulating: open-loop ones stay numpy arrays.
        self._tokens_open = (input_tokens, output_tokens)
        self._tokens_closed: list[tuple[int, int]] = []
        self._tokens_lists: tuple[list[int], list[int]] | None = None
        # The routing uniforms are read only where a request has several candidates: arrays of doubles
        # (the same values), not millions of Python floats made up front.
        self.u1 = array("d", np.ascontiguousarray(route_u[:, 0], dtype=float).tobytes())
        self.u2 = array("d", np.ascontiguousarray(route_u[:, 1], dtype=float).tobytes())
        self.start: list[float] = [np.nan] * n
        self.end: list[float] = [np.nan] * n
        self.instance: list[int] = [-1] * n
        self.device: list[int] = [-1] * n      # the device that served it (sim.hosting.device)
        # requests whose service ended after their client gave up (a timeout): when it ended
        self.served_late: dict[int, float] = {}
        # when a language model's request got its first token (nan: none yet), a column made by the first
        # continuous-batching device (track_first_token); None in a run without one. An array of doubles:
        # to_arrays copies it as it is, where a list's floats (made one by one, all over memory) would be
        # read one at a time.
        self.first_token: array | None = None
        self.status: list[int] = [IN_FLIGHT] * n
        self.load: list[float] = [0.0] * n
        self.cold: list[bool] = [False] * n
        # the service draws, kept apart where a sustained-load service rescales ``service`` (keep_draws)
        self.drawn: list[float] | None = None

    def track_first_token(self) -> array:
        """The ``first_token`` column (made at the first call)."""
        if self.first_token is None:
            self.first_token = array("d", [math.nan]) * len(self.arrival)
        return self.first_token

    def keep_draws(self) -> None:
        if self.drawn is None:
            self.drawn = list(self.service)

    def __len__(self) -> int:
        return len(self.arrival)

    def append(self, arrival: float, model: int, service: float, input_tokens: int, output_tokens: int,
               u1: float, u2: float) -> int:
        """Add a request (closed-loop users create theirs as they go); returns its index."""
        self.arrival.append(arrival)
        self.model.append(model)
        self.service.append(service)
        if self.drawn is not None:
            self.drawn.append(service)
        self._tokens_closed.append((input_tokens, output_tokens))
        self.u1.append(u1)
        self.u2.append(u2)
        self.start.append(np.nan)
        self.end.append(np.nan)
        self.instance.append(-1)
        self.device.append(-1)
        self.status.append(IN_FLIGHT)
        self.load.append(0.0)
        self.cold.append(False)
        if self.first_token is not None:
            self.first_token.append(math.nan)
        return len(self.arrival) - 1

    def tokens(self, i: int) -> tuple[int, int]:
        """Request ``i``'s input and output tokens."""
        if i < self.n_open:
            return int(self._tokens_open[0][i]), int(self._tokens_open[1][i])
        return self._tokens_closed[i - self.n_open]

    def open_tokens(self) -> tuple[list[int], list[int]]:
        """The open-loop requests' input and output tokens as lists (built once, for the devices that
        read them per request: continuous batching)."""
        if self._tokens_lists is None:
            tin, tout = self._tokens_open
            self._tokens_lists = (np.asarray(tin).astype(np.int64).tolist(),
                                  np.asarray(tout).astype(np.int64).tolist())
        return self._tokens_lists

    def to_arrays(self) -> dict[str, np.ndarray]:
        # Lists of Python floats to arrays with np.fromiter: np.asarray first walks the list to find its
        # type (several times slower on millions of rows). The open-loop arrivals and models are the arrays
        # given, copied, unless requests were appended (closed loop). (Service times change while running:
        # sustained load, continuous batching.)
        n = len(self.arrival)
        floats = lambda x: np.fromiter(x, dtype=float, count=n)  # noqa: E731
        arrival, model = self._open
        same = n == self.n_open
        end = floats(self.end)
        return {
            "arrival": np.array(arrival, dtype=float) if same else floats(self.arrival),
            "model": np.array(model, dtype=np.int32) if same else np.asarray(self.model, dtype=np.int32),
            "service": floats(self.service),
            "input_tokens": np.concatenate([self._tokens_open[0].astype(np.int64),
                                            np.array([t[0] for t in self._tokens_closed], dtype=np.int64)]),
            "output_tokens": np.concatenate([self._tokens_open[1].astype(np.int64),
                                             np.array([t[1] for t in self._tokens_closed], dtype=np.int64)]),
            "start": floats(self.start),
            "end": end,
            "instance": np.asarray(self.instance, dtype=np.int32),
            "device": np.asarray(self.device, dtype=np.int32),
            "status": np.asarray(self.status, dtype=np.int8),
            "load": floats(self.load),
            "cold": np.asarray(self.cold, dtype=bool),
            "served_end": self._served_end(end),
            "first_token": np.full(n, np.nan) if self.first_token is None else np.array(self.first_token, dtype=float),
        }

    def _served_end(self, end: np.ndarray) -> np.ndarray:
        """When each request's service ended: its ``end`` (the column as an array), or later for one served
        past its timeout."""
        out = end.copy()
        if self.served_late:
            k = np.fromiter(self.served_late.keys(), dtype=np.int64)
            out[k] = np.fromiter(self.served_late.values(), dtype=float)
        return out


class Engine:
    """Owns the SimPy environment, the request table and the arrival cursor.

    Hosting runtimes register per model a function ``arrive(i)`` and report a
    finished request through :meth:`finish`.
    """

    def __init__(self, requests: Requests):
        self.env = simpy.Environment()
        self.requests = requests
        self.arrive_of_model: list[Callable[[int], None]] = []
        # closed-loop hooks: request index -> function called when it finishes
        self.on_finish: dict[int, Callable[[int], None]] = {}
        self.closed_loop = False
        self.device_gpus: list[int] = []   # GPUs of each device (sim.hosting.device), by index
        self.horizon = float("inf")      # when the run stops (set by run): nothing at or after it happens
        # The open-loop arrivals are not on SimPy's heap: they are already in time order, so the run's loop
        # (:meth:`_run_until`) takes the next one from the table when it comes before the heap's first
        # entry. ``_cursor``: the next one; ``_cursor_eid``: the calendar's sequence number it holds, drawn
        # where the entry that walked the arrivals was scheduled (so ties fall out as they did on the heap).
        self._cursor = 0
        self._cursor_eid = -1

    # -- scheduling -----------------------------------------------------------
    def at(self, delay: float, callback: Callable[[Call], None], arg: object = None, obj: object = None) -> Call:
        """Call ``callback(call)`` after ``delay`` simulated seconds, with ``call.arg``, ``call.obj`` set."""
        call = Call([callback], arg, obj)
        env = self.env
        # Inlined Environment.schedule: this is the hot path.
        heappush(env._queue, (env._now + delay, NORMAL, next(env._eid), call))
        return call

    def inject(self, i: int) -> None:
        """Schedule the arrival of an appended request ``i`` (closed loop) at its arrival time."""
        self.at(self.requests.arrival[i] - self.env._now, self._arrive_one, i)

    def _arrive_one(self, call: Call) -> None:
        i = call.arg
        self.arrive_of_model[self.requests.model[i]](i)

    def finish(self, i: int, status: int, end: float) -> None:
        """Record request ``i`` as finished with ``status`` at time ``end``."""
        r = self.requests
        r.status[i] = status
        r.end[i] = end
        if self.closed_loop:
            hook = self.on_finish.pop(i, None)
            if hook is not None:
                hook(i)

    # -- running --------------------------------------------------------------
    def run(self, horizon: float, progress: Callable[[float], None] | None = None, steps: int = 100) -> None:
        """Run to ``horizon``; with ``progress``, in ``steps`` slices of simulated time, calling
        ``progress(fraction of the horizon done)`` after each. The slices change no result: each stop is an
        urgent event of its own at the slice's end, after which the queue resumes in the same order."""
        self.horizon = horizon
        r = self.requests
        if r.n_open:
            self._cursor_eid = next(self.env._eid)
        # No cyclic garbage collection while the calendar runs: a run makes next to no reference cycles
        # (a few hundred objects for 10^5 requests), yet the collector would walk its young objects
        # every few hundred allocations and, now and then, every object of the process (the request
        # table's columns included). Whatever cycles the run leaves are collected after it.
        enabled = gc.isenabled()
        gc.disable()
        try:
            if progress is None or horizon <= 0:
                self._run_until(horizon)
                return
            for k in range(1, steps + 1):
                t = horizon if k == steps else horizon * k / steps
                if t > self.env.now:
                    self._run_until(t)
                progress(k / steps)
        finally:
            if enabled:
                gc.enable()

    def _run_until(self, until: float) -> None:
        """``env.run(until=until)``, with SimPy's ``run`` and ``step`` in one loop here, and the open-loop
        arrivals merged in from the request table instead of the heap: the same events in the same order
        (by time, priority, then sequence number, as SimPy's heap orders them; the same stop event, the
        same handling of a stop and of a failed event), without a call of ``step`` per event nor a heap
        push and pop per arrival. Hot: once per event."""
        env = self.env
        at = until if isinstance(until, int) else float(until)
        if at <= env._now:
            raise ValueError(f"until ({at}) must be greater than the current simulation time")
        stop = simpy.Event(env)
        stop._ok = True
        stop._value = None
        env.schedule(stop, URGENT, at - env._now)
        stop.callbacks.append(StopSimulation.callback)
        q = env._queue
        eid = env._eid
        r = self.requests
        arrival, model, n_open = r.arrival, r.model, r.n_open
        arrive = self.arrive_of_model
        i = self._cursor                                    # the next open-loop arrival ...
        ta = arrival[i] if i < n_open else math.inf         # ... its time ...
        ea = self._cursor_eid                               # ... and its sequence number
        try:
            while True:
                if q:
                    top = q[0]
                    t = top[0]
                    # The arrival first when its key (ta, NORMAL, ea) is the smaller, as on the heap.
                    first = ta < t or (ta == t and (top[1] > NORMAL or (top[1] == NORMAL and ea < top[2])))
                elif ta < math.inf:
                    first = True
                else:
                    raise EmptySchedule
                if first:
                    env._now = ta
                    self._cursor = i + 1
                    arrive[model[i]](i)
                    i += 1
                    if i < n_open:
                        ta = arrival[i]
                        ea = next(eid)
                    else:
                        ta = math.inf
                    continue
                env._now, _, _, event = heappop(q)
                callbacks, event.callbacks = event.callbacks, None
                try:
                    for callback in callbacks:
                        callback(event)
                except StopSimulation:
                    # As SimPy's step: the event's remaining callbacks run when the simulation resumes.
                    event.callbacks = callbacks[callbacks.index(callback) + 1:]
                    env.schedule(event, -1)
                    raise
                if not event._ok and not hasattr(event, "_defused"):
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    raise exc
        except StopSimulation:
            return
        except EmptySchedule:
            raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {stop}') from None
        finally:
            self._cursor_eid = ea
