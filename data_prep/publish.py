"""Build beside PREP and publish with a rename, under a lock, so PREP is never half-written.

A second `prepare` on the same PREP (a retried Kubernetes Job) waits on the lock, then finds the
work done. A run stopped by SIGTERM or Ctrl-C removes its build directory; one killed outright
leaves it, named with its pid, and the next run removes it once that pid is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts import lock
from contracts.errors import InputError
from contracts.files import _alive


class Stopped(KeyboardInterrupt):
    """A SIGTERM raised as an exception (as Ctrl-C raises KeyboardInterrupt), so the cleanup on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises Stopped instead of ending the process at once (main thread only; an ignored
    SIGTERM stays ignored). Kubernetes and the launcher stop a prepare with SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lock_path(out: Path) -> Path:
    """PREP + '.lock', beside PREP (a lock inside PREP would not survive its replacement)."""
    return out.with_name(out.name + ".lock")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on PREP's lock file, waiting for another prepare to finish first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out.parent}: cannot create the lock file {lock_path(out).name} ({exc.strerror})") from None
    with lock.acquire(lock_path(out), str(out), wait=True):
        yield


def _temp_prefix(out: Path, kind: str) -> str:
    """The start of the name of a temporary sibling of OUT: .OUT.tmp-PID- (build) or .OUT.old-PID- (swap)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _temps(out: Path) -> Iterator[tuple[Path, str, int]]:
    """(path, 'tmp' or 'old', writer pid) of each directory beside OUT named as _temp_prefix names them
    (mkdtemp adds 8 characters): nothing else beside OUT is ever treated as ours."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[a-z0-9_]{{8}}")
    for path in out.parent.iterdir():
        named = pattern.fullmatch(path.name)
        if named and path.is_dir() and not path.is_symlink():
            yield path, named.group(1), int(named.group(2))


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary siblings of OUT whose writer is gone (killed); return them (call with the lock held).

    A writer killed between publish's two renames left OUT missing and the previous OUT in .OUT.old-*/prev:
    that is put back instead of deleted.
    """
    removed = []
    for path, kind, pid in _temps(out):
        if _alive(pid):
            continue
        if kind == "old" and (path / "prev").is_dir() and not os.path.lexists(out):
            os.rename(path / "prev", out)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def discard_build(out: Path) -> None:
    """Delete this process's build directories beside OUT, found by name: a stop may come between
    mkdtemp creating one and the caller learning its path."""
    for path, kind, pid in _temps(out):
        if kind == "tmp" and pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def build_dir(out: Path) -> Path:
    """A fresh temporary sibling of PREP, on the same file system so publishing is a rename.

    Readable by all (mkdtemp makes it private): ranks may run as other users.
    """
    try:
        built = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    except OSError as exc:
        raise InputError(f"{out.parent}: cannot create a build directory beside {out.name} ({exc.strerror})") from None
    built.chmod(0o755)
    return built


def publish(built: Path, out: Path) -> None:
    """Move STAGED to OUT; an existing OUT is swapped out and removed only once STAGED is in place."""
    if not os.path.lexists(out):
        os.rename(built, out)
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent)) / "prev"
    os.rename(out, old)
    try:
        os.rename(built, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old.parent, ignore_errors=True)
