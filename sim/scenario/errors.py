"""Errors a user sees: one paragraph naming the file, the key path and what was expected."""
from __future__ import annotations


class ScenarioError(Exception):
    """A scenario that cannot be loaded or run, with a message fit for a user."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        self.message = message   # without its source and key path
        parts = [p for p in (source, path) if p]
        super().__init__(": ".join(parts + [message]))


def format_path(loc: tuple | list) -> str:
    """``('endpoints', 1, 'instance_type')`` -> ``endpoints[1].instance_type``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def suggest(name: str, choices, n: int = 1) -> str:
    """`` (did you mean X?)`` when a close match exists, else an empty string."""
    from difflib import get_close_matches

    close = get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
