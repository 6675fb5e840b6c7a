"""A progress bar for long runs: drawn on a terminal (rich, on stderr), nothing when stderr is not one
(a pipe, a file, CI logs, a notebook)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def bar(description: str, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """Yields ``update(fraction done)``: a transient progress bar on stderr when it is a terminal and
    ``enabled``, else a function that does nothing."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda fraction: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(description, total=1.0)
        yield lambda fraction: p.update(task, completed=fraction)
