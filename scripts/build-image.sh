#!/usr/bin/env bash
# `make image`: the CPU image, localhost/cifar10-hvd:cpu, built from this checkout with podman (Docker
# where its daemon answers and podman is not installed).
#
# usage: scripts/build-image.sh [TAG]        (default: $IMAGE or localhost/cifar10-hvd:cpu)
# env:   BASE_CPU  the Debian 12 base to build on; default: debian:12 if the registry serves it, else
#                  localhost/cifar10-hvd-base:debian12, bootstrapped here once with mmdebstrap from this
#                  machine's own apt sources
#        CA_BUNDLE the TLS trust pip uses inside the build (default: this machine's, where it has one);
#                  passed as a build secret, so it is never stored in a layer
#
# --format docker: the Dockerfile's SHELL (bash with pipefail) is a Docker-format field; podman's default
# OCI format would drop it. What this machine needs is passed on the command line (scripts/container-flags.sh finds it), never written
# into its container configuration.
# A second run with nothing changed is answered from the layer cache in seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-${IMAGE:-localhost/cifar10-hvd:cpu}}
local_base=localhost/cifar10-hvd-base:debian12
registry_base=docker.io/library/debian:12

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "build-image: missing $*; install with: sudo apt-get install -y $*" >&2
    exit 1
  fi
  echo "build-image: installing $* (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. The engine: podman (with runc beside its default runtime), or a Docker whose daemon answers (a Docker
# client alone, with no daemon to talk to, builds nothing).
if command -v podman >/dev/null 2>&1; then
  engine=podman
elif command -v docker >/dev/null 2>&1 && timeout 30 docker info >/dev/null 2>&1; then
  engine=docker
else
  apt_install podman runc
  engine=podman
fi
[ "$engine" = podman ] && ! command -v runc >/dev/null 2>&1 && apt_install runc

# 2. The base: the one asked for, else the registry's, else a local bootstrap (made once, then reused).
base=${BASE_CPU:-}
if [ -z "$base" ]; then
  if "$engine" image inspect "$local_base" >/dev/null 2>&1; then
    base=$local_base
  elif timeout 120 "$engine" pull -q "$registry_base" >/dev/null 2>&1; then
    base=$registry_base
  else
    command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sources=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -s "$f" ] && sources+=("$f")
    done
    echo "build-image: $registry_base cannot be pulled; bootstrapping $local_base with mmdebstrap"
    # The machine's apt options that let its mirror answer (a snapshot's expired Release files) go along.
    mmdebstrap --quiet --variant=minbase --mode=root --include=ca-certificates \
      --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
      bookworm "$tmp/base.tar" "${sources[@]}"
    "$engine" import "$tmp/base.tar" "$local_base" >/dev/null  # docker import has no --quiet
    base=$local_base
  fi
fi

# 3. What podman needs on this machine to start a container (runtime, ulimits).
flags=()
if [ "$engine" = podman ]; then
  found=$(bash "$here/scripts/container-flags.sh" "$base")
  [ -n "$found" ] && mapfile -t flags <<<"$found"
fi

# 4. The build.
ca=${CA_BUNDLE:-}
for candidate in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  [ -z "$ca" ] && [ -n "$candidate" ] && [ -f "$candidate" ] && ca=$candidate
done
secret=()
[ -n "$ca" ] && secret=(--secret "id=ca-certificates,src=$ca")
build=(build --format docker "${flags[@]}" "${secret[@]}" --network host
       --build-arg VARIANT=cpu --build-arg "BASE_CPU=$base" -t "$tag" "$here")
[ "$engine" = docker ] && build=(build "${secret[@]}" --network host --build-arg VARIANT=cpu
                                 --build-arg "BASE_CPU=$base" -t "$tag" "$here")
echo "build-image: $engine ${build[*]}"
start=$(date +%s)
"$engine" "${build[@]}"
echo "build-image: $tag built in $(( $(date +%s) - start )) s on $base"
