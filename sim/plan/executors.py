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
- :class:`LocalExecutor`: a ``concurrent.futures.ProcessPoolExecutor`` of
  ``workers`` processes (default: all cores).
- :class:`DaskExecutor`: a Dask distributed cluster
  (``dask.distributed.Client(address)``, address ``tcp://HOST:PORT``, or a
  Client you made). The workers need capsim installed (same version) and, for
  scenarios that read trace or profile files, the same paths.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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


def _cpu_count() -> int:
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


class LocalExecutor(Executor):
    """A pool of ``workers`` processes on this machine (default: one per core)."""

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or _cpu_count())
        self._pool: ProcessPoolExecutor | None = None
        self._pending: set[Future] = set()

    def map(self, fn, items):
        items = list(items)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_exit_with_parent,
                                             initargs=(os.getpid(),))
        # Submit everything now (before any progress thread starts): the pool forks its workers here.
        index = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        self._pending = set(index)

        def gen():
            while self._pending:
                done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=index.__getitem__):
                    try:
                        yield index[fut], Outcome(value=fut.result())
                    except Exception as e:   # a worker died (BrokenProcessPool) or the result would not pickle
                        yield index[fut], Outcome(error=e)

        return gen()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        interrupted = any(not f.done() for f in self._pending)
        for f in self._pending:
            f.cancel()
        if interrupted:
            # Stop the points still running (our own worker processes) instead of waiting for them.
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                try:
                    p.terminate()
                except Exception:   # already gone
                    pass
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        self._pending = set()


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
