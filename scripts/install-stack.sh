#!/usr/bin/env bash
# The one list of install steps for the stack. `make setup` runs it into .venv; the
# Dockerfile runs it too (tests/test_k8s.py checks both call this script), so a
# local install and the image can never drift apart.
#
# usage: scripts/install-stack.sh VENV [EXTRAS]
#   VENV    the virtual environment to create or update (created with python3.11)
#   EXTRAS  pip extras of this package to install, e.g. "dev" (default: none)
# env: HOROVOD_GPU_OPERATIONS=NCCL etc. pass through to the Horovod build (and step 5 then wants NCCL);
#      SKIP_APT=1 skips the apt steps (Open MPI, sshd, libarchive13; the image installs them in its own layers);
#      EDITABLE=0 installs the package non-editable; MXNET_PACKAGE: see step 3.
set -euo pipefail

venv=${1:?usage: install-stack.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

# 1. Open MPI (Horovod's MPI controller and mpi4py build against it) and OpenSSH's sshd (the test suite's
#    local cluster, scripts/local-cluster.sh, runs one per host, as the image's workers do).
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin libopenmpi-dev)
# sshd only where the cluster tests can run (root: they make namespaces); elsewhere they skip
[ -x /usr/sbin/sshd ] || [ "$(id -u)" != 0 ] || missing+=(openssh-server)
if [ "${SKIP_APT:-0}" != 1 ] && [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "install-stack: installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "install-stack: ${missing[*]} missing. Install with:" >&2
    echo "    sudo apt-get install -y ${missing[*]}" >&2
    echo "then run 'make setup' again." >&2
    exit 1
  fi
fi

# 1b. libarchive (libarchive-c streams the competition's 7z archives through it; Debian/Ubuntu: libarchive13).
# Found the way libarchive-c finds it (ctypes.util.find_library), which works without /sbin on PATH.
if [ "${SKIP_APT:-0}" != 1 ] && ! "$python" -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('archive'))"; then
  if [ "$(id -u)" = 0 ]; then
    echo "install-stack: installing libarchive13 (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libarchive13 >/dev/null
  else
    echo "install-stack: the libarchive shared library is missing. Install it with:" >&2
    echo "    sudo apt-get install -y libarchive13" >&2
    echo "then run 'make setup' again." >&2
    exit 1
  fi
fi

# 2. The virtual environment and build tools Horovod's setup.py needs. CMake below 4: CMake 4 refuses the
#    cmake_minimum_required of the gloo that Horovod 0.28.1 bundles.
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
venv=$(cd "$venv" && pwd)  # absolute: Horovod's build runs the venv's cmake from its own build directory
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install wheel "setuptools<70" "cmake>=3.13,<4"

# 3. This package (editable) with its pinned runtime deps (mxnet, numpy 1.23.5, ...).
#    MXNET_PACKAGE (the GPU image: mxnet-cu117==1.9.1) replaces setup.py's CPU mxnet: it goes in
#    first, the package without deps, then every other requirement read back from its metadata, so
#    setup.py stays the one list of them.
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
editable=(); [ "${EDITABLE:-1}" = 1 ] && editable=(-e)
if [ -z "${MXNET_PACKAGE:-}" ]; then
  $pip install "${editable[@]}" "$spec"
else
  $pip install "$MXNET_PACKAGE"
  $pip install --no-deps "${editable[@]}" "$spec"
  mapfile -t reqs < <("$venv/bin/python" - "$extras" <<'PY'
import importlib.metadata as md, re, sys
extras = set(filter(None, sys.argv[1].split(",")))
for req in md.requires("cifar10-hvd") or []:
    spec, _, marker = (s.strip() for s in req.partition(";"))
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
    if re.split(r"[\s<>=!~\[(]", spec)[0].lower() != "mxnet" and (extra is None or extra.group(1) in extras):
        print(spec if extra or not marker else f"{spec}; {marker}")
PY
  )
  $pip install "${reqs[@]}"
fi

# 4. Horovod 0.28.1, built against the installed MXNet with MPI and Gloo controllers, with the venv's
#    CMake (HOROVOD_CMAKE) and the venv first on PATH: a build host (the image's build stage) may have
#    neither cmake nor pip on PATH, and Horovod's build falls back to running them from there.
if ! "$venv/bin/python" -c "import horovod.mxnet" >/dev/null 2>&1; then
  echo "install-stack: building horovod 0.28.1 (about 2 minutes)"
  HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CMAKE="$venv/bin/cmake" PATH="$venv/bin:$PATH" \
    $pip install --no-build-isolation --no-cache-dir horovod==0.28.1
fi

# 5. Fail loudly unless horovodrun sees MXNet, MPI and Gloo.
check=$(PATH="$venv/bin:$PATH" "$venv/bin/horovodrun" --check-build)
for want in "MXNet" "MPI" "Gloo" ${HOROVOD_GPU_OPERATIONS:+NCCL}; do
  if ! grep -Eq "\[X\] $want\$" <<<"$check"; then
    echo "$check" >&2
    echo "install-stack: horovodrun --check-build does not list $want as built" >&2
    exit 1
  fi
done
echo "install-stack: ok (horovod with MXNet, MPI, Gloo in $venv)"
