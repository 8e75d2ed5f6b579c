"""A stage's child process tree ends with the launcher: a signal to `cifar10-hvd run` ends all of it.

Each stage runs in a session of its own, so a terminal's Ctrl-C reaches only the launcher, which then
ends the stage on purpose: SIGTERM to every process of the tree, SIGKILL after GRACE_SECONDS. The tree
is found in /proc, not by process group alone: horovodrun's Gloo launcher starts each rank under a
middleman in a new session (horovod.runner.common.util.safe_shell_exec), out of any group we could signal.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_SECONDS = 5.0  # SIGTERM first (horovodrun then stops its ranks itself), SIGKILL what is left after this


class Stopped(Exception):
    """The launcher was sent SIGNUM; its exit status is 128 + SIGNUM, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGTERM, SIGINT and SIGHUP raise Stopped in the main thread (where the launcher waits)."""
    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_launcher() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by kill -9 (Linux's parent-death signal)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def call(cmd: list[str], env: dict[str, str]) -> int:
    """Run CMD in a session of its own and return its exit status; on any interruption end its tree first.

    A launcher killed with -9 cannot end the tree: the child then gets SIGTERM from the kernel, and
    horovodrun or mpirun stops its ranks, as on a signal.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_launcher)
    try:
        return proc.wait()
    except BaseException:
        end_tree(proc)
        raise


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) from /proc/PID/stat, None if PID is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    return int(fields[1]), fields[0], fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every living descendant of PID as {pid: start time} (the start time tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry))
            started[int(entry)] = st[2]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z" and st[2] == started


def _signal(proc: subprocess.Popen, tree: dict[int, str], sig: int) -> None:
    """SIG to the child's process group and to every process of TREE that is still the one we saw."""
    for pid, started in tree.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    if proc.returncode is None:  # not reaped yet, so its pid (the group's id) cannot have been reused
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM PROC's whole tree, SIGKILL whatever is left after GRACE seconds, and reap PROC.

    Further signals are ignored meanwhile: a second Ctrl-C must not cut the clean-up short.
    """
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        tree = descendants(proc.pid)
        _signal(proc, tree, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is None:
                tree.update(descendants(proc.pid))  # anything started meanwhile (before horovodrun exits)
            if proc.poll() is not None and not any(_alive(p, s) for p, s in tree.items()):
                return
            time.sleep(0.1)
        _signal(proc, tree, signal.SIGKILL)
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
