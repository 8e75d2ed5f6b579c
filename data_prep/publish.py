"""Build beside PREP and publish with a rename, under a lock, so PREP is never half-written.

A second `prepare` on the same PREP (a retried Kubernetes Job) waits on the lock, then finds the
work done. Leftovers of a killed run (its temporary siblings) are removed by the next run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep import lock
from data_prep.errors import PrepareError


def lock_path(out: Path) -> Path:
    """PREP + '.lock', beside PREP (a lock inside PREP would not survive its replacement)."""
    return out.with_name(out.name + ".lock")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on PREP's lock file, waiting for another prepare to finish first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"{out.parent}: cannot create the lock file {lock_path(out).name} ({exc.strerror})") from None
    with lock.acquire(lock_path(out), str(out), wait=True):
        yield


def remove_leftovers(out: Path) -> None:
    """Delete temporary siblings left by a run that was killed (call with the lock held)."""
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for path in out.parent.glob(prefix + "*"):
            shutil.rmtree(path, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh temporary sibling of PREP, on the same file system so publishing is a rename.

    Readable by all (mkdtemp makes it private): ranks may run as other users.
    """
    try:
        staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise PrepareError(f"{out.parent}: cannot create a build directory beside {out.name} ({exc.strerror})") from None
    staged.chmod(0o755)
    return staged


def publish(staged: Path, out: Path) -> None:
    """Move STAGED to OUT; an existing OUT is swapped out and removed only once STAGED is in place."""
    if not os.path.lexists(out):
        os.rename(staged, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "prev"
    os.rename(out, old)
    try:
        os.rename(staged, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old.parent, ignore_errors=True)
