"""What `cifar10-hvd run` may replace in WORKDIR, and how: only run directories it wrote, built beside.

A train stage writes WORKDIR/<stage> (tune, final). When that directory already holds a run that must be
replaced (unfinished, or from another config, and no --resume), the new run is trained in the sibling
WORKDIR/.<stage>.next and renamed into place once complete: the old run stays whole until then. A
directory is replaced only when it is a run directory this project wrote (is_run_dir); anything else in
the way is an error that names it, and nothing is changed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from contracts.errors import InputError
from contracts.lock import DIR_LOCK, acquire
from data_prep.publish import publish, remove_leftovers
from trainer.rundir import RUN_CONFIG


class WorkdirError(InputError):
    """Something in WORKDIR that run did not write is in the way (exit status 2)."""


def is_run_dir(path: Path) -> bool:
    """PATH is a run directory this project wrote: the trainer's writer lock or its config.json record is there."""
    if (path / DIR_LOCK).is_file():
        return True
    try:
        record = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "train" in record and "phase" in record


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def replacement(target: Path) -> Path:
    """Where a run that replaces TARGET is built: WORKDIR/.<stage>.next."""
    return target.with_name(f".{target.name}.next")


def stage_dir(target: Path, resume: bool) -> Path:
    """The directory a train stage writes now: TARGET, or replacement(TARGET) when TARGET holds a run to replace.

    With RESUME, a replacement that was cut off is continued before TARGET itself. Reads only:
    WorkdirError when TARGET or its replacement sibling exists and is not this project's.
    """
    replacing = replacement(target)
    if os.path.lexists(replacing) and not (is_run_dir(replacing) or _empty_dir(replacing)):
        raise WorkdirError(f"{replacing}: exists and is not a run directory of cifar10-hvd; move it away "
                           "(nothing was changed)")
    if resume and os.path.lexists(replacing):
        return replacing
    if not os.path.lexists(target) or _empty_dir(target):
        return target
    if not target.is_dir() or not is_run_dir(target):
        raise WorkdirError(f"{target}: exists and is not a run directory of cifar10-hvd (no {RUN_CONFIG} "
                           f"or {DIR_LOCK} written by `cifar10-hvd train`); move it away or choose another "
                           "--workdir (nothing was changed)")
    return target if resume else replacing


STOPPING_SECONDS = 10.0  # how long a writer that is being stopped (its launcher just ended) may take to go


def _not_in_use(run_dir: Path) -> None:
    """Busy (exit 2) if a live writer holds RUN_DIR, e.g. a stage another launcher left running."""
    if (run_dir / DIR_LOCK).is_file():
        acquire(run_dir / DIR_LOCK, f"run directory {run_dir}", patience=STOPPING_SECONDS).release()


def begin(out_dir: Path, target: Path, resume: bool) -> None:
    """Before training into OUT_DIR: refuse while a live writer holds TARGET or OUT_DIR; clear swap leftovers,
    and a cut-off replacement when starting over."""
    _not_in_use(target)
    _not_in_use(out_dir)
    remove_leftovers(target)  # .<stage>.old-* left when a swap was killed half-way (ours by name)
    if out_dir != target:
        print(f"[run] {target.name}: {target} holds an earlier, unfinished or different run; training the new "
              f"one in {out_dir}, which replaces it once complete (pass --resume to continue a cut-off run "
              "from its last checkpoint)", flush=True)
        if not resume and os.path.lexists(out_dir):
            shutil.rmtree(out_dir)  # a replacement we started and did not finish (stage_dir checked it is ours)


def finish(out_dir: Path, target: Path) -> None:
    """After the stage succeeded: move a run built beside TARGET into its place (the old one goes last)."""
    if out_dir != target:
        publish(out_dir, target)
