"""Where the points of a sweep run: in-process, a local process pool, or a Dask cluster.

Every executor has the same interface: ``map(fn, items)`` submits ``fn(item)``
for each item and returns an iterator of ``(index, outcome)`` pairs in the
order the points finish, where ``outcome`` is an :class:`Outcome` holding
either the value or the exception the executor met (a worker that died, a
cluster that went away). ``fn`` and the items must be picklable (``fn`` a
module-level function): the same function runs the same item to the same
result whichever executor runs it, because everything random in a point
derives from the point (its scenario seed and replication index), never from
the worker.

- :class:`SerialExecutor`: in this process, one point after the other
  (``--workers 1``), easiest to debug and to interrupt.
- :class:`LocalExecutor`: ``workers`` processes of its own (default: all
  cores), one point at a time each. A worker that dies (killed with SIGKILL,
  by the kernel's out-of-memory killer) fails the point it was running, and
  that point only: a new worker takes its place for the others. (A
  ``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one of
  its workers dies, failing every point not yet finished.)
- :class:`DaskExecutor`: a Dask distributed cluster
  (``dask.distributed.Client(address)``, address ``tcp://HOST:PORT``, or a
  Client you made). The workers need capsim installed (same version) and, for
  scenarios that read trace or profile files, the same paths.
"""
from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..scenario import ScenarioError


@dataclass
class Outcome:
    """What an executor got for one item: ``value``, or ``error`` (the executor's, not the point's)."""

    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor:
    """Base class: map a picklable function over items, yielding ``(index, Outcome)`` as they complete."""

    name = "executor"
    workers = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[int, Outcome]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers; after an interruption, stop the points still running."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


class SerialExecutor(Executor):
    """One point after the other, in this process."""

    name = "serial"

    def map(self, fn, items):
        items = list(items)

        def gen():
            for i, item in enumerate(items):
                yield i, Outcome(value=fn(item))   # an exception here is a bug of fn: let it propagate

        return gen()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _exit_with_parent(parent: int) -> None:
    """In a pool worker: exit when the process that started the pool is gone (killed with SIGKILL, say),
    instead of waiting forever on a queue nobody will write to again."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="capsim-parent-watch", daemon=True).start()


class WorkerDied(RuntimeError):
    """The worker process running an item exited before it answered (a signal, the OOM killer)."""


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = "; the machine may have run out of memory" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def _worker_main(conn, parent: int) -> None:
    """A worker: run ``fn(item)`` for each ``(fn, item)`` received, answer ``(True, value)`` or
    ``(False, exception)``; stop on None, when the pipe closes or when the parent is gone."""
    import sys

    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle: it stops us
    # Forked while another thread of the parent may have held the standard streams' locks (a progress
    # bar): fresh stream objects, so that a warning printed here cannot wait on a lock nobody releases.
    try:
        sys.stdout = open(os.dup(1), "w", encoding="utf-8", errors="replace", closefd=True)
        sys.stderr = open(os.dup(2), "w", encoding="utf-8", errors="replace", closefd=True)
    except OSError:
        pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, item = msg
        try:
            answer = (True, fn(item))
        except BaseException as e:   # noqa: BLE001 - reported to the parent as this item's outcome
            answer = (False, e)
        try:
            conn.send(answer)
        except Exception as e:   # the value or the exception would not pickle
            conn.send((False, RuntimeError(f"the result could not be sent back: {type(e).__name__}: {e}")))


class _Worker:
    __slots__ = ("proc", "conn", "item")

    def __init__(self, ctx) -> None:
        here, there = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(there, os.getpid()), daemon=True)
        self.proc.start()
        there.close()
        self.conn = here
        self.item: int | None = None   # the index of the item it runs

    def stop(self, kill: bool = False) -> None:
        if kill and self.proc.is_alive():
            self.proc.terminate()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        self.proc.join(timeout=5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5.0)
        self.conn.close()


class LocalExecutor(Executor):
    """``workers`` processes on this machine (default: one per core), each running one item at a time.

    A worker that dies fails the item it was running, and only that one: the item's outcome holds a
    :class:`WorkerDied` error, and a new worker takes its place for the items still to run."""

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or cpu_count())
        self._live: list[_Worker] = []
        self._busy = False

    def map(self, fn, items):
        import multiprocessing
        from multiprocessing.connection import wait as wait_for

        items = list(items)
        ctx = multiprocessing.get_context()
        # Start the workers now (before any progress thread starts): they are forked from this process.
        while len(self._live) < min(self.workers, len(items)):
            self._live.append(_Worker(ctx))
        todo = deque(range(len(items)))

        def gen():
            self._busy = True
            idle = [w for w in self._live]
            running: list[_Worker] = []
            while todo or running:
                while todo and idle:
                    w = idle.pop()
                    if not w.proc.is_alive():   # it died while idle: no item of its own to fail
                        w.stop(kill=True)
                        self._live.remove(w)
                        w = _Worker(ctx)
                        self._live.append(w)
                    w.item = todo.popleft()
                    try:
                        w.conn.send((fn, items[w.item]))
                    except (OSError, ValueError):   # it died while idle: its sentinel says so below
                        pass
                    running.append(w)
                wait_for([w.conn for w in running] + [w.proc.sentinel for w in running])
                for w in list(running):
                    outcome = None
                    if w.conn.poll():
                        try:
                            ok, value = w.conn.recv()
                            outcome = Outcome(value=value) if ok else Outcome(error=value)
                        except (EOFError, OSError):
                            outcome = None
                        except Exception as e:   # an answer that would not unpickle
                            outcome = Outcome(error=RuntimeError(f"the result could not be read back: "
                                                                 f"{type(e).__name__}: {e}"))
                    if outcome is None and w.proc.is_alive():
                        continue
                    i, w.item = w.item, None
                    running.remove(w)
                    if outcome is not None:
                        idle.append(w)
                        yield i, outcome
                        continue
                    # The worker died with the item: that item fails; a new worker takes its place.
                    w.proc.join(timeout=1.0)
                    how = _how_it_ended(w.proc.exitcode)
                    w.conn.close()
                    self._live.remove(w)
                    if todo:
                        fresh = _Worker(ctx)
                        self._live.append(fresh)
                        idle.append(fresh)
                    yield i, Outcome(error=WorkerDied(f"the worker process running it died ({how})"))
            self._busy = False

        return gen()

    def close(self) -> None:
        live, self._live = self._live, []
        interrupted = self._busy or any(w.item is not None for w in live)
        for w in live:   # after an interruption, stop the points still running instead of waiting for them
            w.stop(kill=interrupted)
        self._busy = False


class DaskExecutor(Executor):
    """The same work on a Dask distributed cluster: ``DaskExecutor("tcp://10.0.0.5:8786")``."""

    name = "dask"

    def __init__(self, address: Any):
        try:
            from dask.distributed import Client
        except ImportError:  # pragma: no cover - dask is the `distributed` extra
            raise ScenarioError("running on a Dask cluster needs dask.distributed: "
                                "pip install 'capsim[distributed]'", source="--scheduler") from None
        self._own = not isinstance(address, Client)
        if self._own:
            try:
                self.client = Client(address, timeout="20s")
            except (OSError, TimeoutError, ValueError) as e:
                raise ScenarioError(f"cannot connect to the Dask scheduler at {address} ({e}); expected "
                                    "tcp://HOST:PORT of a running dask scheduler", source="--scheduler") from None
        else:
            self.client = address
        self.address = getattr(self.client.scheduler, "address", str(address))
        self._futures: list = []

    @property
    def workers(self) -> int:  # type: ignore[override]
        try:
            return max(1, sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values()))
        except Exception:
            return 1

    def describe(self) -> str:
        return f"dask at {self.address} ({self.workers} worker threads)"

    def map(self, fn, items):
        from dask.distributed import as_completed

        items = list(items)
        # pure=False: each item is its own task even if two items are equal; the key names the point.
        futures = [self.client.submit(fn, item, pure=False) for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        self._futures = futures

        def gen():
            for fut in as_completed(futures):
                i = index[fut.key]
                try:
                    yield i, Outcome(value=fut.result())
                except Exception as e:   # KilledWorker, a lost connection, ...
                    yield i, Outcome(error=e)
                finally:
                    fut.release()

        return gen()

    def close(self) -> None:
        pending = [f for f in self._futures if not f.done()]
        if pending:
            try:
                self.client.cancel(pending)
            except Exception:
                pass
        self._futures = []
        if self._own:
            self.client.close()


def make_executor(workers: int | None = None, scheduler: Any = None) -> Executor:
    """The executor the CLI options ask for: ``scheduler`` -> Dask; ``workers == 1`` -> serial;
    else a local process pool of ``workers`` (default: all cores)."""
    if scheduler:
        return DaskExecutor(scheduler)
    if workers is not None and workers < 1:
        raise ScenarioError(f"expected at least 1 worker, got {workers}", source="--workers")
    if workers == 1:
        return SerialExecutor()
    return LocalExecutor(workers)
