"""`cifar10-hvd doctor`: what the stack has (Python, MXNet, Horovod, MPI, GPUs) and plainly what is missing."""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str | None:
    """A command's stdout, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def gpu_report(gpus: list[tuple[str, tuple[int, int]]], build: str, archs: tuple | None) -> tuple[list[str], list[str]]:
    """(lines, problems) for the GPUs (name, compute capability) the driver shows, against the MXNet build's kernels."""
    from trainer.cuda_arch import describe_build, kernel_for, support_problem

    carries = describe_build(*archs) if archs else "architectures not known for this build"
    lines = [f"mxnet build {build}: {carries}"] if gpus else []
    problems = []
    for i, (name, cc) in enumerate(gpus):
        target = kernel_for(cc, *archs) if archs else None
        verdict = f"runs {target}" if target else ("no kernels in this build" if archs else "unknown")
        lines.append(f"gpu {i}       {name}, compute capability {cc[0]}.{cc[1]}: {verdict}")
        problem = support_problem(cc, name, build, archs)
        if problem:
            problems.append(problem)
    return lines, problems


def horovod_check(n_gpus: int) -> tuple[list[str], list[str]]:
    """(lines, problems) for Horovod: which frameworks and controllers it was built with."""
    lines: list[str] = []
    problems: list[str] = []
    try:
        import horovod
        from horovod.common.util import extension_available, gloo_built, mpi_built, nccl_built

        has_mx = extension_available("mxnet")
        flags = {"MXNet": has_mx,
                 "MPI": has_mx and mpi_built(verbose=False),
                 "Gloo": has_mx and gloo_built(verbose=False),
                 "NCCL": has_mx and bool(nccl_built(verbose=False))}
        built = [w for w, ok in flags.items() if ok]
        lines.append(f"horovod     {horovod.__version__} (built with: {', '.join(built) or 'nothing usable'})")
        for want in ("MXNet", "MPI", "Gloo"):
            if want not in built:
                problems.append(f"horovod is not built with {want} (re-run `make setup`)")
        if n_gpus and "NCCL" not in built:
            problems.append("GPUs are visible but horovod has no NCCL operations (build with HOROVOD_GPU_OPERATIONS=NCCL)")
    except ImportError:
        problems.append("horovod is not installed (run `make setup`; it builds horovod 0.28.1 against mxnet)")
    return lines, problems


def checks() -> tuple[list[str], list[str]]:
    """(report lines, problems) for the current environment."""
    lines = [f"python      {platform.python_version()} ({sys.executable})"]
    problems: list[str] = []
    try:
        import numpy

        lines.append(f"numpy       {numpy.__version__}")
        if not numpy.__version__.startswith("1."):
            problems.append(f"numpy {numpy.__version__}: mxnet 1.9.1 needs numpy 1.x (setup.py pins 1.23.5)")
    except ImportError:
        problems.append("numpy is not installed (run `make setup`)")
    n_gpus = 0
    try:
        import mxnet as mx
        from mxnet.runtime import Features

        feats = Features()
        n_gpus = mx.context.num_gpus()
        lines.append(f"mxnet       {mx.__version__} (MKLDNN: {'yes' if feats.is_enabled('MKLDNN') else 'no'}, "
                     f"CUDA: {'yes' if feats.is_enabled('CUDA') else 'no'}, NCCL: {'yes' if feats.is_enabled('NCCL') else 'no'})")
        lines.append(f"gpus        {n_gpus} visible to mxnet")
    except ImportError as e:
        problems.append(f"mxnet cannot be imported: {e} (run `make setup`)")
    hvd_lines, hvd_problems = horovod_check(n_gpus)
    lines += hvd_lines
    problems += hvd_problems
    mpi = _run(["mpirun", "--version"])
    if mpi:
        lines.append(f"open mpi    {mpi.splitlines()[0]}")
    else:
        problems.append("Open MPI is missing: apt-get install -y openmpi-bin libopenmpi-dev")
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    lines.append(f"nvidia-smi  {'; '.join(smi.strip().splitlines()) if smi else 'not found (CPU only)'}")
    from trainer.cuda_arch import installed_build, visible_gpus

    gpu_lines, gpu_problems = gpu_report(visible_gpus(), *installed_build())
    lines += gpu_lines
    problems += gpu_problems
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    """Print the report; exit 1 when something the job needs is missing."""
    argparse.ArgumentParser(prog="cifar10-hvd doctor", description=__doc__).parse_args(argv)
    lines, problems = checks()
    print("\n".join(lines))
    if problems:
        print("\nmissing:")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    print("\nall set: mxnet, horovod (MXNet, MPI, Gloo) and Open MPI are in place")
    return 0
