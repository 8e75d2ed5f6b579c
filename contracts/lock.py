"""One writer at a time: an exclusive lock on a file that records who holds it (pid and host).

The lock is an flock on the file, so it dies with its holder (kill -9 included): a lock file left
by a dead writer never blocks the next one. Its text only names the holder for the error message.
Used for the prepared directory (prepare waits its turn) and for run directories (train and run
refuse at once: two writers of one run would interleave their epochs).
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from contracts.errors import InputError


class Busy(InputError):
    """Another live process holds the lock; the message names its pid and host (exit status 2)."""


class Lock:
    """A held lock (fd -1: none held); release() (or leaving a `with` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Free the lock (closing the file releases the flock); safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


RECORD_PATIENCE = 2.0  # seconds a loser waits for a new holder to record itself (it does so right after its flock)


def _record(path: Path) -> dict:
    """The lock file's key=value fields ({} when it cannot be read)."""
    try:
        return dict(item.split("=", 1) for item in Path(path).read_text().split() if "=" in item)
    except OSError:
        return {}


def _names_live_holder(fields: dict) -> bool:
    """True when the record names a pid and host, and the pid still runs if the host is this one
    (the file keeps a dead writer's record until the next holder overwrites it)."""
    if "pid" not in fields or "host" not in fields:
        return False
    if fields["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(fields["pid"]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        pass
    return True


def holder(path: Path, patience: float = RECORD_PATIENCE) -> str:
    """'pid N on host H' as the lock file records it, or 'another process' when it does not say.

    The holder writes its record just after taking the flock, so a loser that looks in between finds
    the file empty (or a dead writer's record): wait up to PATIENCE seconds for the current one.
    """
    deadline = time.monotonic() + patience
    fields = _record(path)
    while not _names_live_holder(fields) and time.monotonic() < deadline:
        time.sleep(0.02)
        fields = _record(path)
    if _names_live_holder(fields):
        return f"pid {fields['pid']} on host {fields['host']}"
    return "another process"


def _try(fd: int, patience: float) -> bool:
    """Take the flock on FD, trying for up to PATIENCE seconds; False if another process still holds it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def acquire(path: str | Path, what: str, wait: bool = False, patience: float = 0.0) -> Lock:
    """Take the exclusive lock PATH (created if missing) for WHAT, e.g. 'run directory /x'.

    Held by another live process: wait for it when WAIT (saying so on stderr), else give it PATIENCE
    seconds to end (a writer that is being stopped) and then raise Busy naming WHAT and the holder.
    InputError if the lock file cannot be created.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the lock file for {what} ({exc.strerror})") from None
    try:
        if not _try(fd, 0 if wait else patience):
            busy = f"{what} is in use by {holder(path)} (lock {path})"
            if not wait:
                raise Busy(f"{busy}; wait for it to finish, or stop that process first")
            print(f"{busy}; waiting for it ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
    return Lock(path, fd)


DIR_LOCK = ".cifar10-hvd.lock"  # a run directory's writer lock, inside it (run directories are not swapped)


def lock_dir(directory: str | Path, what: str) -> Lock:
    """Take DIRECTORY's writer lock (DIRECTORY/DIR_LOCK), creating DIRECTORY; Busy if another writer holds it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create the {what} ({exc.strerror})") from None
    return acquire(directory / DIR_LOCK, f"{what} {directory}")
