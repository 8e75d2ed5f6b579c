"""Writing a file so that readers see the old file or the new one, never half of it."""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.errors import InputError

# the name atomic_write gives its temporary: .NAME.tmpPID beside NAME
TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def temp_path(path: Path) -> Path:
    """The temporary sibling atomic_write writes before renaming (matches TEMP_NAME)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words ('a FIFO'), from its st_mode."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "a special file")


def check_output(path: str | Path, what: str = "output") -> None:
    """InputError unless path is a regular file or nothing: a rename onto anything else would replace it
    (a device node, even /dev/null for every user of the machine, a FIFO, a link, a folder)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there; a missing folder is reported by the write itself
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: {what} is not a regular file ({file_kind(mode)}); refusing to replace it "
                         "(give the path of a regular file or of none)")


def atomic_write(path: str | Path, write: Callable[[str], Any], what: str = "output") -> None:
    """Call write(tmp_path) for a temporary sibling of path, then rename it onto path.

    Only a regular file (or nothing) at path is replaced: anything else is an InputError naming path.
    """
    path = Path(path)
    check_output(path, what)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        check_output(path, what)  # again: something may have appeared there while write ran
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_bounded(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file at path (links followed); InputError naming path for anything else or
    for more than limit bytes. OSError (missing, no permission) is left to the caller, who knows the hint.

    The type is checked before opening (opening a FIFO with no writer would block) and again on the open
    file (the path may have changed in between); the read stops at limit + 1 bytes whatever the size said.
    """
    _check_readable(path, os.stat(path), limit, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        _check_readable(path, os.fstat(fd), limit, what)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: {what} is over the limit of {limit:,} bytes")
    return data


def _check_readable(path: str | Path, st: os.stat_result, limit: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: {what} is not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > limit:
        raise InputError(f"{path}: {what} is {st.st_size:,} bytes, over the limit of {limit:,} bytes")


def remove_stale_temps(folder: str | Path, of: str | None = None) -> list[Path]:
    """Remove atomic_write temporaries in folder whose writing process is gone (left by a kill); return them.

    Only names matching TEMP_NAME are touched, and only plain files: nothing this project did not write.
    of: only the temporaries of the file of that name (in a folder the project shares with others).
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_NAME.match(p.name)
        if m and of is not None and p.name != f".{of}.tmp{m.group(1)}":
            continue
        if m and p.is_file() and not p.is_symlink() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (this process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
