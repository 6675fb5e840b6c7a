"""Result folders as a unit, safe default folder names, and files that honour the umask.

A run (``capsim run``), a comparison and an optimisation each write a *set* of files
(summary.json, requests.parquet, timeline.csv, plots/, ...). :func:`publish` writes the
set into a fresh hidden folder beside the target (``.NAME.capsim-tmp-PID-XXXX``), flushes
it to disk and then puts it in place with one rename (on Linux an atomic exchange of the
two folders, ``renameat2(RENAME_EXCHANGE)``), so a reader finds the old complete set or
the new complete set, never a new summary.json beside an old requests.parquet, and no file
of the old set survives beside the new one (a run without plots leaves no old plots/).

What the target folder held that the set does not own (a run folder's ``compare/`` and
``optimize/`` subfolders, say: the default places of those verbs) is carried over into the
new folder. A folder holding files capsim did not write is refused rather than replaced.
A process killed during a save leaves at most its hidden temporary folder beside the
target; the next save there removes it (and puts back anything carried over that a kill
stranded in it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

# What each kind of result set owns: replaced as a whole by a new save of that kind.
RUN_FILES = frozenset({"summary.json", "requests.parquet", "timeline.csv", "plots", "report.html"})
COMPARE_FILES = frozenset({"compare.json", "plans", "runs", "plots", "report.html"})
OPTIMIZE_FILES = frozenset({"optimize.json", "best.yaml", "plans.csv", "frontier.csv", "frontier.png"})
OWNED = {"run": RUN_FILES, "compare": COMPARE_FILES, "optimize": OPTIMIZE_FILES}
# Entries that may sit in a result folder besides a set's own: other verbs' default subfolders,
# sweep files, reports. A folder holding anything else was not written by capsim.
KNOWN = RUN_FILES | COMPARE_FILES | OPTIMIZE_FILES | frozenset(
    {"compare", "optimize", "sweep", "points", "sweep.json", "results.parquet", "results.csv", "fidelity.json"})

_TMP_TAG = ".capsim-tmp-"
_OLD_TAG = ".capsim-old-"


class OutputError(Exception):
    """Results that cannot be written (a full disk, a read-only folder, a bad --out): one paragraph."""


# -- names ------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: object, fallback: str = "scenario") -> str:
    """A scenario's name as one folder name: never a path (``../../x``, ``/tmp/x``), never hidden, no
    control characters. Letters, digits and ``._+-`` are kept; any other run of characters becomes
    ``_``; leading dots and underscores are dropped; at most 100 characters."""
    s = _UNSAFE.sub("_", str(name if name is not None else "")).strip("._ ")
    s = s[:100].rstrip("._ ")
    return s or fallback


def default_dir(name: object, *sub: str) -> Path:
    """``results/<safe name>/<sub...>``: where a verb writes when no --out is given."""
    return Path("results", safe_name(name), *sub)


# -- umask ------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask (read from /proc where possible: ``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the umask (0666 & ~umask), as ``open()`` would give it."""
    return 0o666 & ~current_umask()


# -- CSV --------------------------------------------------------------------------------------------
_CSV_SPECIAL = (",", '"', "\n", "\r")


def _csv_column(s) -> list | None:
    """A column's fields as ``DataFrame.to_csv`` writes them (floats as ``repr``, NaN empty), or None
    where the fast path does not apply (a field that would need quoting, another type)."""
    import numpy as np

    v = s.to_numpy()
    if v.dtype == np.float64:
        # each distinct value formatted once; by its bits, so that -0.0 stays apart from 0.0
        _, first, inv = np.unique(v.view(np.int64), return_index=True, return_inverse=True)
        text = np.array(["" if x != x else repr(x) for x in v[first].tolist()], dtype=object)
        return text[inv.ravel()]
    if v.dtype.kind in "iub":
        _, first, inv = np.unique(v, return_index=True, return_inverse=True)
        return np.array([str(x) for x in v[first].tolist()], dtype=object)[inv.ravel()]
    vals = s.tolist()
    if all(type(x) is str and x and not any(c in x for c in _CSV_SPECIAL) for x in set(vals)):
        return vals
    return None


def csv_text(df) -> str:
    """``df.to_csv(index=False)``'s text, the same to the byte, about five times faster on a frame of
    numbers and plain names (timeline.csv): each distinct value is formatted once. Frames it does not
    cover (a field that needs quoting, a column of objects, a single column) go to ``to_csv``."""
    cols = []
    names = [str(c) for c in df.columns]
    if len(names) < 2 or any(not n or any(ch in n for ch in _CSV_SPECIAL) for n in names) \
            or len(set(names)) != len(names):
        return df.to_csv(index=False)
    for n in df.columns:
        col = _csv_column(df[n])
        if col is None:
            return df.to_csv(index=False)
        cols.append(col)
    lines = [",".join(names)]
    lines.extend(map(",".join, zip(*cols)))
    return "\n".join(lines) + "\n"


# -- publishing ------------------------------------------------------------------------------------
def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno in (errno.EROFS,):
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if e.errno == errno.EEXIST:
        return "exists and is not a folder"
    return e.strerror or str(e)


def output_error(target: Path, e: OSError, what: str = "results") -> OutputError:
    where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(target) else ""
    hint = ("free some space, or choose another folder with --out" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose another folder with --out")
    return OutputError(f"{target}: cannot write the {what}: {_describe(e)}{where}; nothing was changed there: "
                       f"{hint}.")


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False   # an old kernel, or a file system without the exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> list[Path]:
    """Hidden temporary folders of saves to ``target`` whose process is gone (killed during a save)."""
    out = []
    prefix = f".{target.name}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        n = p.name
        for tag in (_TMP_TAG, _OLD_TAG):
            if n.startswith(prefix + tag):
                try:
                    pid = int(n[len(prefix + tag):].split("-")[0])
                except ValueError:
                    continue
                if not _alive(pid):
                    out.append(p)
    return out


def temporary_prefix(path: Path) -> str:
    """The prefix of a temporary file written beside ``path`` before it is renamed into place
    (:func:`sim.api.atomic_write`): ``.NAME.PID.``, so that what a killed process left can be told
    from what a live one is writing."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (``.NAME.PID.XXXX.tmp``) that processes killed while writing left in
    ``folder``: those whose process is gone, and those of older versions (no process id in the name)
    more than an hour old. Returns what was removed."""
    import time

    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        n = p.name
        if not (n.startswith(".") and n.endswith(".tmp")) or _TMP_TAG in n or _OLD_TAG in n:
            continue
        parts = n[1:-4].rsplit(".", 2)
        stale = False
        if len(parts) == 3 and parts[1].isdigit():
            stale = not _alive(int(parts[1]))
        else:
            try:
                stale = time.time() - p.lstat().st_mtime > 3600
            except OSError:
                continue
        if stale and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def cleanup(target: str | Path, owned: Iterable[str] = ()) -> None:
    """Remove what killed saves to ``target`` left beside it; anything they had carried over (not in
    ``owned`` nor a set's own file) and that the target lacks is put back first."""
    target = Path(target)
    for p in _leftovers(target):
        if _OLD_TAG in p.name and target.is_dir():
            for e in list(p.iterdir()):
                if e.name not in RUN_FILES | COMPARE_FILES | OPTIMIZE_FILES and not (target / e.name).exists():
                    try:
                        os.rename(e, target / e.name)
                    except OSError:
                        pass
        shutil.rmtree(p, ignore_errors=True)


def check_target(target: Path, kind: str) -> None:
    """Refuse a target that is a file, the current folder (or above it), or a folder of other files."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; expected a folder for the results (--out)")
    try:
        here = Path.cwd().resolve()
        full = target.resolve()
        if full == here or full in here.parents:
            raise OutputError(f"{target}: is the current folder or one above it; capsim replaces a results "
                              "folder as a whole: choose a folder of its own with --out (e.g. results/mine)")
    except OSError:
        pass
    if target.is_dir():
        try:
            foreign = sorted(e.name for e in target.iterdir() if e.name not in KNOWN
                             and not e.name.startswith("."))
        except OSError as e:
            raise output_error(target, e) from None
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise OutputError(f"{target}: holds files capsim did not write ({shown}); capsim replaces a results "
                              f"folder as a whole, so it will not write its {kind} results there: choose an empty "
                              "or new folder with --out")


def preflight(target: str | Path, kind: str = "run") -> None:
    """Before any work: refuse an output folder that cannot be written (see :func:`check_target`; an
    ancestor that is a file; the nearest existing ancestor not writable)."""
    target = Path(target)
    check_target(target, kind)
    p = target.parent if not target.exists() else target
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise output_error(target, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p)))
    if not os.access(p, os.W_OK | os.X_OK):
        raise output_error(target, OSError(errno.EACCES, os.strerror(errno.EACCES), str(p)))


def publish(target: str | Path, write: Callable[[Path], None], kind: str = "run") -> Path:
    """Write a result set with ``write(folder)`` into a temporary folder beside ``target`` and put it in
    place as a unit (see the module's doc). Entries of an existing ``target`` that ``kind``'s set does
    not own are carried over. OSError (a full disk, a read-only folder) becomes :class:`OutputError`;
    the target is then unchanged."""
    target = Path(target)
    owned = OWNED[kind]
    check_target(target, kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(target, e) from None
    cleanup(target, owned)
    tmp = target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    swapped = False
    try:
        os.mkdir(tmp, 0o777)     # the umask applies, as to any folder
        write(tmp)
        _fsync_tree(tmp)
        if target.is_dir():
            if _exchange(tmp, target):
                old = tmp            # the exchange left the old set where the new one was
            else:
                old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(target, old)
                os.rename(tmp, target)
            swapped = True
            stranded = False
            for e in list(old.iterdir()):   # carry over what this set does not own
                if e.name not in owned and not e.name.startswith(".") and not (target / e.name).exists():
                    try:
                        os.rename(e, target / e.name)
                    except OSError:
                        stranded = True
            if not stranded:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
            swapped = True
        _fsync_dir(target.parent)
    except OSError as e:
        if swapped:   # the new set is in place; only flushing the folder failed
            return target
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(target, e) from None
    except BaseException:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
