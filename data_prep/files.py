"""Writing a file so that readers see the old file or the new one, never half of it."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the name atomic_write gives its temporary: .NAME.tmpPID beside NAME
TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def temp_path(path: Path) -> Path:
    """The temporary sibling atomic_write writes before renaming (matches TEMP_NAME)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) for a temporary sibling of path, then rename it onto path."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove atomic_write temporaries in folder whose writing process is gone (left by a kill); return them.

    Only names matching TEMP_NAME are touched, and only plain files: nothing this project did not write.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_NAME.match(p.name)
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
