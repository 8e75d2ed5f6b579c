"""Horovod start-up and the device rule: one rank per GPU, else CPU with OMP threads per rank."""
from __future__ import annotations

import os


def mpi_world() -> tuple[int, int] | None:
    """(rank, size) from the launcher's environment (horovodrun, mpirun, PMI), else None: no MPI world."""
    for rank_var, size_var in (("HOROVOD_RANK", "HOROVOD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return None


def set_cpu_threads(threads: int = 0) -> int:
    """Set OMP_NUM_THREADS for this rank before MXNet starts its engine; 0 = cores / local ranks.

    Must run before `import mxnet`: MXNet reads the variable once, at import.
    """
    if threads <= 0:
        if "OMP_NUM_THREADS" in os.environ and os.environ.get("CIFAR10_HVD_THREADS_AUTO") != "1":
            return int(os.environ["OMP_NUM_THREADS"])
        local = int(os.environ.get("HOROVOD_LOCAL_SIZE") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    return threads


# Horovod's background thread wakes every HOROVOD_CYCLE_TIME ms (default 1). Ranks sharing CPU cores
# lose that time from their convolutions: at width 16 on 2 cores, -np 2 trains about 20% faster at 10 ms
# (benchmarks/bench_train.py, scaling). GPU ranks keep Horovod's default latency.
CPU_CYCLE_TIME_MS = "10"


def init_horovod(stage: str = "train"):
    """Initialise Horovod and return the module (hvd.rank(), hvd.size(), ...), with this rank's peer
    failure detector running (trainer.watchdog; STAGE: the command its messages name).

    CPU ranks default HOROVOD_CYCLE_TIME to CPU_CYCLE_TIME_MS; a value set by the user
    (or by `horovodrun --cycle-time-ms`) wins.
    """
    import horovod.mxnet as hvd
    import mxnet as mx

    if mx.context.num_gpus() == 0:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", CPU_CYCLE_TIME_MS)
    hvd.init()
    from trainer import watchdog

    watchdog.start(hvd, stage)
    return hvd


def context(hvd):
    """mx.gpu(local_rank) when GPUs are visible, else mx.cpu(): the same code path either way."""
    import mxnet as mx

    if mx.context.num_gpus() > 0:
        return mx.gpu(hvd.local_rank() % mx.context.num_gpus())
    return mx.cpu()


def device_problem(amp: str, ctx) -> str | None:
    """Why this rank cannot train on ctx: amp precision unsupported there, or a GPU without MXNet kernels."""
    from trainer.cuda_arch import gpu_problem
    from trainer.precision import amp_error

    return amp_error(amp, ctx.device_type) or gpu_problem(ctx)
