"""Which GPUs the installed MXNet has kernels for, checked before the first kernel fails.

A CUDA build carries machine code (cubins, sm_XY) for some architectures and optionally PTX
(compute_XY) that the driver can compile for newer ones. A cubin for sm_XY runs on a device
of compute capability X.Z with Z >= Y; PTX for compute_XY runs on any capability >= X.Y.
mxnet-cu117 1.9.1 is built with MXNET_CUDA_ARCH "5.0;6.0;7.0;8.0;8.6" and no "+PTX" entry
(config/distribution/linux_cu117.cmake; cmake/upstream/select_compute_arch.cmake emits PTX only
for "+PTX" entries), so Maxwell through Ampere and Ada (8.9) run and Hopper (9.0) and newer fail
with "no kernel image is available for execution on the device".
"""
from __future__ import annotations

import ctypes

_PYPI_ARCHS = ((5, 0), (6, 0), (7, 0), (8, 0), (8, 6))
# pip distribution -> (cubin architectures, PTX architectures), from MXNet 1.9.1's config/distribution/*.cmake
KNOWN_BUILDS: dict[str, tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]] = {
    "mxnet-cu112": (_PYPI_ARCHS, ()),
    "mxnet-cu117": (_PYPI_ARCHS, ()),
}
NO_KERNEL = "no kernel image is available for execution on the device"


def kernel_for(cc: tuple[int, int], sm: tuple, ptx: tuple) -> str | None:
    """The build target the driver would run on a device of compute capability cc, or None if there is none."""
    cubins = [a for a in sm if a[0] == cc[0] and a[1] <= cc[1]]
    if cubins:
        return "sm_{}{}".format(*max(cubins))
    jit = [a for a in ptx if a <= cc]
    if jit:
        return "compute_{}{} (PTX, compiled by the driver at start-up)".format(*max(jit))
    return None


def describe_build(sm: tuple, ptx: tuple) -> str:
    """'sm_50 sm_60 ... and no PTX': what a build carries, for messages."""
    cubins = " ".join("sm_{}{}".format(*a) for a in sm)
    return cubins + (" + PTX " + " ".join("compute_{}{}".format(*a) for a in ptx) if ptx else " and no PTX")


def support_problem(cc: tuple[int, int], gpu_name: str, build: str, archs: tuple | None) -> str | None:
    """Why build (pip name and version) cannot run on this GPU, or None when it can or its archs are unknown."""
    if archs is None:
        return None
    sm, ptx = archs
    if kernel_for(cc, sm, ptx) is not None:
        return None
    return (f"GPU {gpu_name} has compute capability {cc[0]}.{cc[1]}, but {build} carries kernels for "
            f"{describe_build(sm, ptx)}: every MXNet kernel would fail with '{NO_KERNEL}'. Use a GPU of compute "
            f"capability {sm[0][0]}.{sm[0][1]} to {sm[-1][0]}.x (Maxwell to Ampere/Ada for the PyPI builds), or an "
            f"MXNet built with MXNET_CUDA_ARCH including {cc[0]}.{cc[1]} (or +PTX)")


def installed_build() -> tuple[str, tuple | None]:
    """('mxnet-cu117 1.9.1', its (sm, ptx)) for the installed MXNet distribution; archs None when not known."""
    from importlib import metadata

    names = metadata.packages_distributions().get("mxnet") or ["mxnet"]
    for name in sorted(names, key=lambda n: n.lower() not in KNOWN_BUILDS):  # a known CUDA build first
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return f"{name} {version}", KNOWN_BUILDS.get(name.lower())
    return "mxnet (unknown build)", None


def _libcuda():
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def visible_gpus() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of each GPU the CUDA driver shows this process; [] without a driver."""
    cuda = _libcuda()
    if cuda is None or cuda.cuInit(0) != 0:
        return []
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    found = []
    for i in range(count.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
            continue
        cuda.cuDeviceGetName(name, 256, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        found.append((name.value.decode(errors="replace"), (major.value, minor.value)))
    return found


def gpu_problem(ctx) -> str | None:
    """Why the installed MXNet cannot run on ctx (a GPU it has no kernels for), or None; None on CPU.

    The table check names the supported architectures; a one-element probe catches builds not in the table.
    """
    import mxnet as mx

    if ctx.device_type != "gpu":
        return None
    gpus = visible_gpus()
    build, archs = installed_build()
    if ctx.device_id < len(gpus):
        name, cc = gpus[ctx.device_id]
        problem = support_problem(cc, name, build, archs)
        if problem:
            return problem
    try:
        (mx.nd.ones((1,), ctx=ctx) + 1).asnumpy()
    except mx.base.MXNetError as e:
        if "no kernel image" in str(e):
            return f"{ctx}: {build} has no kernels for this GPU ('{NO_KERNEL}')"
        raise
    return None
