#!/usr/bin/env bash
# The flags `podman run` and `podman build` need on this machine, one per line, found by starting a
# container of IMAGE: none where podman's defaults work; otherwise runc where the default runtime (crun)
# refuses the cgroup setup, and ulimits this sandbox grants (podman's defaults can exceed its limits).
# Nothing is written into the machine's container configuration.
#
# usage: scripts/container-flags.sh IMAGE      (exit 1 if no combination starts a container)
set -euo pipefail
image=${1:?usage: container-flags.sh IMAGE}

works() { podman run --rm --entrypoint true "$@" "$image" >/dev/null 2>&1; }

runtimes=("")
command -v runc >/dev/null 2>&1 && runtimes+=("runc")
hard_nofile=$(ulimit -Hn)
hard_nproc=$(ulimit -Hu)
for runtime in "${runtimes[@]}"; do
  flags=()
  [ -n "$runtime" ] && flags=(--runtime "$runtime")
  if works "${flags[@]}"; then printf '%s\n' "${flags[@]}"; exit 0; fi
  for nproc in "$hard_nproc" 65536 32768 16384 8192 4096; do
    [ "$hard_nproc" != unlimited ] && [ "$nproc" != "$hard_nproc" ] && [ "$nproc" -gt "$hard_nproc" ] && continue
    limits=(--ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit "nproc=$nproc:$nproc")
    if works "${flags[@]}" "${limits[@]}"; then printf '%s\n' "${flags[@]}" "${limits[@]}"; exit 0; fi
  done
done
echo "container-flags: podman cannot start a container of $image here (tried runtimes: default ${runtimes[*]:1}; ulimits)" >&2
podman run --rm --entrypoint true "$image" >&2 || true
exit 1
