"""Shared fixtures: the venv's tools, real horovodrun launches, demo data and a prepared dir."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from launcher.run import child_env, horovodrun_argv

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the launcher's (venv on PATH, Open MPI allowed as root), 1 thread a rank."""
    return child_env(**{"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1", **extra})


def run_cli(args: list[str], timeout: float = 600, check: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run `cifar10-hvd ARGS` from the venv and capture its output."""
    proc = subprocess.run([str(BIN / "cifar10-hvd"), *args], capture_output=True, text=True,
                          timeout=timeout, env=tool_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"cifar10-hvd {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def horovodrun(np_: int, cmd: list[str], controller: str = "gloo", timeout: float = 600,
               check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Launch cmd under a real `horovodrun -np N -H localhost:N --gloo|--mpi`."""
    proc = subprocess.run(horovodrun_argv(np_, cmd, controller), capture_output=True, text=True, timeout=timeout,
                          env=tool_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"horovodrun exited {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """A small procedural Kaggle-layout dataset (600 train, 97 test), made once per session."""
    out = tmp_path_factory.mktemp("demo") / "kaggle"
    run_cli(["demo-data", "--out", str(out), "--train", "600", "--test", "97", "--seed", "0"], check=True)
    return out


@pytest.fixture(scope="session")
def prepared(demo_src, tmp_path_factory) -> Path:
    """demo_src prepared by `cifar10-hvd prepare` (valid ratio 0.1)."""
    out = tmp_path_factory.mktemp("prep") / "prepared"
    run_cli(["prepare", "--data", str(demo_src), "--out", str(out), "--workers", "2"], check=True)
    return out


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of SIZE (e.g. "64k") mounted at MOUNT for a full-disk test, unmounted after. Root is needed, as in
    CI: where it cannot be mounted the test fails, it is not skipped."""
    mount.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert made.returncode == 0, f"cannot mount a {size} tmpfs (the full-disk tests run as root): {made.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
