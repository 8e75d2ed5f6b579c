"""Inside an MPI world (horovodrun, mpirun, an MPIJob's launcher) every rank runs `cifar10-hvd run`.

Rank 0 decides (whether a stage runs and where, a one-process stage's exit status) and every rank acts on
its decision: ranks deciding from their own view of the files could disagree and hang in the collectives.
A stage that runs on every rank runs here as its function; a one-process stage runs as rank 0's child
while the other ranks wait.

Under Open MPI (mpirun, horovodrun --mpi, an MPIJob) the decisions travel over mpi4py's COMM_WORLD, so
none needs Horovod or MXNet. Horovod initialised later in the same process (the in-process train and
predict) finds MPI initialised and uses MPI_COMM_WORLD; mpi4py asks for MPI_THREAD_MULTIPLE, which
Horovod's background thread needs. horovodrun --gloo starts no MPI: there Horovod's allreduce carries them (trainer.collectives).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from contracts.errors import run_command
from launcher.launch import child_env
from launcher.stages import Job, Stage, StageFailed
from trainer.device import mpi_world

POLL_SECONDS = 0.05  # how often a rank waiting for rank 0 looks whether it is done (Open MPI)
HOROVOD_POLL_SECONDS = 2.0  # how often rank 0 shares "still running" (Gloo)


class World(Protocol):
    """The ranks of this job, as the launcher sees them."""

    rank: int
    size: int

    def share(self, obj: Any, name: str) -> Any:
        """Rank 0's OBJ on every rank (NAME tells the broadcasts apart where that matters)."""

    def on_rank0(self, stage: str, cmd: list[str]) -> int:
        """Run CMD on rank 0 while the other ranks wait; every rank returns its exit status."""


def _start_on_rank0(stage: str, cmd: list[str]) -> subprocess.Popen:
    print(f"[run] {stage}: {shlex.join(cmd)} (rank 0; the other ranks wait)", flush=True)
    return subprocess.Popen(cmd, env=child_env())


class MpiWorld:
    """A world Open MPI started: the decisions go over mpi4py's COMM_WORLD."""

    joined: MpiWorld | None = None  # this process's, once it has joined (MPI_Init)

    def __init__(self) -> None:
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        MpiWorld.joined = self

    def share(self, obj: Any, name: str) -> Any:
        if self.size == 1:
            return obj
        self._wait_for_all()
        return self.comm.bcast(obj, root=0)

    def _wait_for_all(self) -> None:
        """A barrier that sleeps: Open MPI's blocking calls keep a core busy while they wait, and the ranks
        waiting for rank 0 (deciding, or running prepare) must leave the cores to it."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(POLL_SECONDS)

    def on_rank0(self, stage: str, cmd: list[str]) -> int:
        code = _start_on_rank0(stage, cmd).wait() if self.rank == 0 else None
        return self.share(code, f"{stage}.exit")


class HorovodWorld:
    """A world without MPI to join (horovodrun --gloo): the decisions go through Horovod (trainer.collectives)."""

    def __init__(self, rank: int, size: int, threads: int):
        self.rank, self.size = rank, size
        self.threads = threads  # the CPU threads of the first in-process stage, set before Horovod imports MXNet
        self.hvd = None  # Horovod, once the first decision is shared
        self.shared = 0  # decisions shared so far (each broadcast gets its own name)

    def share(self, obj: Any, name: str) -> Any:
        if self.size == 1:
            return obj
        if self.hvd is None:
            from trainer.device import init_horovod, set_cpu_threads

            set_cpu_threads(self.threads)
            self.hvd = init_horovod("run")
        import mxnet as mx

        from trainer.collectives import broadcast_json

        self.shared += 1
        obj = broadcast_json(obj, 0, f"run.{name}.{self.shared}")
        mx.nd.waitall()  # rank 0's collectives are asynchronous: it must not exit before the others received it
        return obj

    def on_rank0(self, stage: str, cmd: list[str]) -> int:
        """Rank 0 shares 'still running' every HOROVOD_POLL_SECONDS, so no rank blocks long in one collective
        (Horovod's stall warnings)."""
        proc = _start_on_rank0(stage, cmd) if self.rank == 0 else None
        while True:
            code = self.share(proc.poll() if proc else None, f"{stage}.exit")
            if code is not None:
                return code
            if proc:
                time.sleep(HOROVOD_POLL_SECONDS)


def join(job: Job, stages: Sequence[Stage]) -> World | None:
    """The MPI world this process is a rank of (None outside one): Open MPI's where it started this process
    (mpirun, horovodrun --mpi, an MPIJob; horovodrun --gloo sets HOROVOD_RANK), else Horovod's."""
    found = mpi_world()
    if found is None:
        return None
    if "OMPI_COMM_WORLD_SIZE" in os.environ and "HOROVOD_RANK" not in os.environ:
        return MpiWorld()
    first = next((stage.in_world for stage in stages if stage.in_world), None)
    return HorovodWorld(*found, threads=first.threads(job) if first else 0)


def run_here(stage: Stage, job: Job, out_dir: Path, resume: bool, verify: bool) -> Any:
    """The stage's function on this rank (its summary), its errors reported as its CLI would (`cifar10-hvd
    train: ...`, exit 2 for bad input) and raised as StageFailed."""
    function = stage.in_world
    results: list = []
    code = run_command(function.command, lambda: results.append(function.call(job, out_dir, resume, verify)) or 0)
    if code:
        raise StageFailed(stage.name, code)
    return results[0]


def leave(status: int) -> int:
    """STATUS, to exit with. A rank of a world joined through mpi4py that ends on an error exits here, without
    MPI_Finalize: that waits for every rank, and the others may be waiting for this one's decision. mpirun
    then ends them, as it does when any rank exits non-zero."""
    world = MpiWorld.joined
    if status and world is not None and world.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        from trainer import watchdog

        watchdog.goodbye()  # it ends on an error, not lost: mpirun ends the others
        os._exit(status)
    return status
