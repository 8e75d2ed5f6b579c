# syntax=docker/dockerfile:1
# cifar10-hvd: Horovod 0.28.1 (MXNet, MPI and Gloo controllers; NCCL allreduce on GPU) over MXNet 1.9.1,
# Open MPI, and an sshd the Kubeflow MPI Operator's launcher reaches the workers through.
#
#   docker build -t cifar10-hvd:0.1.0-gpu .                            # CUDA 11.7, cuDNN 8, NCCL (default)
#   docker build --build-arg VARIANT=cpu -t cifar10-hvd:0.1.0-cpu .    # CPU only (MKLDNN), Debian 12
#   make image                                                         # the CPU one as localhost/cifar10-hvd:cpu
#
# BASE_CPU: the CPU variant's base, Debian 12 (its python3 is the 3.11 setup.py requires; the mxnet wheel is
# manylinux2014). `make image` passes a base bootstrapped locally with mmdebstrap where the registry's
# cannot be pulled. A TLS trust bundle for pip (a proxy's CA) may be passed as the build secret
# `ca-certificates`; it is mounted for the install step only and never stored in a layer.
# The install steps are scripts/install-stack.sh, the one list `make setup` runs too.
# Base images are pinned by exact tag; pin them by digest as well where your registry policy asks for it.

ARG VARIANT=gpu
ARG BASE_CPU=debian:12

# --- per-variant bases ------------------------------------------------------------------------------
# GPU: the devel image has nvcc and the NCCL headers Horovod's NCCL operations compile against.
FROM nvidia/cuda:11.7.1-cudnn8-devel-ubuntu22.04 AS build-gpu
# mxnet-cu117 is MXNet 1.9.1 built for this CUDA 11.7 toolkit; install-stack.sh installs it in place
# of setup.py's CPU mxnet pin.
# HOROVOD_BUILD_CUDA_CC_LIST: Horovod's CUDA kernels only for the architectures mxnet-cu117 1.9.1 has
# machine code for (sm_50, 60, 70, 80, 86 and no PTX: MXNet's config/distribution/linux_cu117.cmake),
# instead of Horovod's longer default list: a shorter build, and no kernels MXNet could not run beside.
ENV MXNET_PACKAGE=mxnet-cu117==1.9.1 \
    HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_BUILD_CUDA_CC_LIST=50,60,70,80,86

# BASE_CPU is a build argument (Debian 12 by default), tagged by whoever passes it.
# hadolint ignore=DL3006
FROM ${BASE_CPU} AS build-cpu

FROM nvidia/cuda:11.7.1-cudnn8-runtime-ubuntu22.04 AS runtime-gpu

# hadolint ignore=DL3006
FROM ${BASE_CPU} AS runtime-cpu

# --- build: compilers and headers stay in this stage; only /opt/venv leaves it ----------------------
# build-${VARIANT} is one of the stages above (tagged bases), not an untagged registry image.
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian and Ubuntu keep only the newest build of a package in their archives, so an exact apt version pin
# breaks the build at the next security update; the release (12, 22.04) and the base tag fix the versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates g++ make python3.11 python3.11-dev python3.11-venv openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The CUDA driver stub stands in for libcuda.so.1 while MXNet is imported (Horovod's build and its
# --check-build) on a build host without a GPU; it is in this stage's linker path only, as this stage
# is discarded. /opt/cuda-stubs carries the stub (GPU) or nothing (CPU) to the runtime stage's own check.
RUN mkdir -p /opt/cuda-stubs \
 && if [ -d /usr/local/cuda/targets/x86_64-linux/lib/stubs ]; then \
      echo /usr/local/cuda/targets/x86_64-linux/lib/stubs > /etc/ld.so.conf.d/zz-cuda-stubs.conf && ldconfig \
      && cp /usr/local/cuda/targets/x86_64-linux/lib/stubs/libcuda.so /opt/cuda-stubs/; \
    fi
# The same script twice: first with setup.py alone (the pinned dependencies and the Horovod build, a
# layer that stays cached until setup.py or the script changes), then with the sources (the package
# itself; Horovod is there already). SKIP_APT=1: Open MPI came from the layer above. EDITABLE=0: the
# package is copied into the venv. The onnx extra: the final phase writes model.onnx and predict can run
# --engine onnxruntime in the image.
COPY setup.py pyproject.toml ./
COPY scripts/install-stack.sh scripts/
RUN --mount=type=secret,id=ca-certificates,required=false \
    if [ -f /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && SKIP_APT=1 EDITABLE=0 scripts/install-stack.sh /opt/venv onnx
COPY . .
RUN --mount=type=secret,id=ca-certificates,required=false \
    if [ -f /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && SKIP_APT=1 EDITABLE=0 scripts/install-stack.sh /opt/venv onnx

# --- runtime: interpreter, Open MPI, ssh; no compilers ----------------------------------------------
# ibverbs-providers: the userspace RDMA drivers (mlx5...) NCCL's NET/IB needs (k8s/components/rdma);
# without an RDMA device NCCL uses sockets. libquadmath0: the libgfortran.so.3 that the mxnet wheel
# bundles links against it. The host keys openssh-server generates are removed: every copy of the image
# would share them, and the workers' sshd uses the job's key instead.
# runtime-${VARIANT} is one of the stages above, as for the build stage.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Same reason as in the build stage for not pinning apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 libgomp1 libquadmath0 libarchive13 openmpi-bin openssh-client openssh-server ibverbs-providers \
 && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*
# sshd for the MPI Operator, run by the non-root user: port 2222 (no capability needed), the operator's
# per-job key (mounted at the MPIJob's sshAuthMountPath, /home/cifar/.ssh) as host and user key, and
# StrictModes off because that Secret mount is root-owned. DisableForwarding: the job key opens a shell
# for mpirun, not a tunnel through the worker to other addresses. ClientAlive*: a session whose client
# is cut off (network partition) ends after ~30 s instead of staying on the worker until the link
# returns (scripts/local-cluster.sh's sshd uses the same values). The client side dials port 2222 and
# accepts one host key, the job key every real worker serves (mpi-known-hosts prints it from the same
# mount), so a host that answers with another key is refused.
COPY scripts/mpi-known-hosts /usr/local/bin/mpi-known-hosts
RUN printf '%s\n' 'Port 2222' 'HostKey /home/cifar/.ssh/id_rsa' 'AuthorizedKeysFile .ssh/authorized_keys' \
      'PidFile /tmp/sshd.pid' 'StrictModes no' 'UsePAM no' 'PasswordAuthentication no' \
      'KbdInteractiveAuthentication no' 'PermitRootLogin no' 'DisableForwarding yes' 'PermitTunnel no' \
      'ClientAliveInterval 10' 'ClientAliveCountMax 3' \
      > /etc/ssh/sshd_config_mpi \
 && printf '%s\n' 'Host *' '    Port 2222' '    StrictHostKeyChecking yes' '    UserKnownHostsFile /dev/null' \
      '    GlobalKnownHostsFile /dev/null' '    KnownHostsCommand /usr/local/bin/mpi-known-hosts %d/.ssh/id_rsa.pub' \
      '    LogLevel ERROR' > /etc/ssh/ssh_config.d/mpi-operator.conf \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash cifar
COPY --from=build /opt/venv /opt/venv
# LD_LIBRARY_PATH is set in both variants (the CUDA images' value) so `mpirun -x LD_LIBRARY_PATH` always
# has something to forward to ranks started over ssh, which do not inherit the image's environment.
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PYTHONUNBUFFERED=1
# The shipped image proves itself, as Horovod's own Dockerfile does: Horovod's MXNet extension loads
# against this stage's libraries (Open MPI, libgomp, CUDA/NCCL on GPU) and a one-element allreduce
# runs, so a missing shared library fails the build and not the first job. The CUDA driver stub
# stands in for libcuda.so.1 on a build host without a GPU; it is removed and dropped from the
# linker cache after the check (only its COPY layer, a few hundred KB, stays in the history).
COPY --from=build /opt/cuda-stubs /opt/cuda-stubs
RUN ldconfig /opt/cuda-stubs \
 && python -c 'import mxnet as mx, horovod.mxnet as hvd; hvd.init(); total = hvd.allreduce(mx.nd.ones((1,)) * 3, op=hvd.Sum, name="image_check").asscalar(); assert (hvd.size(), total) == (1, 3.0), total; print("horovod.mxnet allreduce ok on", mx.__version__)' \
 && rm -rf /opt/cuda-stubs \
 && ldconfig
USER 1000:1000
WORKDIR /home/cifar
ENTRYPOINT ["cifar10-hvd"]
CMD ["--help"]
