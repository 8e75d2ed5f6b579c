#!/usr/bin/env bash
# A cluster of hosts on this one machine, for the multi-node tests (tests/test_cluster.py) and by hand.
#
#   scripts/local-cluster.sh up --shared DIR NAME...   one host per NAME sharing DIR; returns once every sshd answers
#   scripts/local-cluster.sh exec NAME CMD...          run CMD on host NAME (exit status passed through)
#   scripts/local-cluster.sh kill NAME                 SIGKILL every process of host NAME (sshd included)
#   scripts/local-cluster.sh partition NAME            cut NAME off the network ...
#   scripts/local-cluster.sh heal NAME                 ... and connect it again
#   scripts/local-cluster.sh freeze NAME               SIGSTOP every process of host NAME (a hung node) ...
#   scripts/local-cluster.sh thaw NAME                 ... and SIGCONT them
#   scripts/local-cluster.sh check                     exit 0 if every host is alive and its sshd answers, else 1 naming one
#   scripts/local-cluster.sh down                      remove every host, namespace, bridge and process up made
#
# Each host: its own network namespace (named NAME) with one veth on a bridge that lives in a namespace of its
# own (lc-bridge); an address from 10.213.0.0/24, which exists only inside these namespaces (no route to the
# machine's interfaces, no NAT); its own hostname (UTS namespace) and a mount namespace in which /tmp and
# /dev/shm are private, /etc/hosts is /etc/netns/NAME/hosts (the file `ip netns exec` reads; the machine's
# /etc/hosts is never edited), and /etc/passwd gives uid 1000 the cluster's home. DIR and this checkout (with
# its .venv) are at the same paths on every host, bound back in where they lie under /tmp. A long-lived holder
# process (`sleep infinity`) keeps the namespaces; exec enters them with nsenter.
#
# sshd is Debian's OpenSSH on port 2222, run as uid 1000 the way the image and the MPI Operator run it: the
# per-cluster key is host key and user key (~/.ssh/id_rsa, authorized_keys), StrictModes no, and the client
# config has no known_hosts. When uid 1000 cannot read the checkout or write DIR (e.g. a clone under a 0700
# /root), everything runs as root instead, and `up` says why: root can always read what it cloned.
#
# State lives in $LOCAL_CLUSTER_STATE (default /run/local-cluster); DIR is the caller's and is kept by down.
set -euo pipefail

STATE=${LOCAL_CLUSTER_STATE:-/run/local-cluster}
BRIDGE_NS=lc-bridge
NET=10.213.0
PORT=2222
CHECKOUT=$(cd "$(dirname "$0")/.." && pwd -P)
PYBASE=$(dirname "$(dirname "$(readlink -f "$CHECKOUT/.venv/bin/python")")")  # the venv's interpreter install
ME=local-cluster

die() { echo "$ME: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (network, UTS and mount namespaces); running as uid $(id -u)"; }
host_field() {  # NAME FIELD(2=index 3=ip 4=holder pid)
  [ -f "$STATE/hosts.tsv" ] || die "no cluster is up"
  awk -v n="$1" -v f="$2" '$1 == n { print $f; found = 1 } END { exit !found }' "$STATE/hosts.tsv" \
    || die "no host '$1' in this cluster ($(cut -f1 "$STATE/hosts.tsv" | tr '\n' ' '))"
}
netns_pids() {  # every process in network namespace NAME (one `ip` process, not one `stat` a process: fast under load)
  [ -e "/run/netns/$1" ] || return 0
  ip netns pids "$1" 2>/dev/null || true
}
kill_netns() {  # NAME [KEEP_PID]: SIGKILL until nothing (but KEEP_PID) is left; processes may fork meanwhile
  local round pids
  for round in $(seq 600); do  # 60 s at least: a loaded machine may take long to end them
    pids=$(netns_pids "$1" | grep -vx "${2:-none}" || true)
    [ -z "$pids" ] && return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes of $1 survive SIGKILL: $pids"
}
in_host() {  # PID CMD...: run CMD as root in the host's namespaces
  local pid=$1; shift
  nsenter -t "$pid" -u -m -n -- "$@"
}
as_user() {  # the prefix that drops to the cluster's user
  if [ "$(cat "$STATE/user")" = root ]; then echo env; else echo "setpriv --reuid 1000 --regid 1000 --clear-groups"; fi
}

write_files() {  # SHARED NAME...: keys, ssh configs, passwd/group, hosts
  local shared=$1; shift
  local home=$STATE/home i=0 name
  mkdir -p "$home/.ssh"
  ssh-keygen -q -t rsa -b 2048 -N "" -C "$ME" -f "$home/.ssh/id_rsa"
  cp "$home/.ssh/id_rsa.pub" "$home/.ssh/authorized_keys"
  printf '%s\n' 'Host *' "    Port $PORT" '    StrictHostKeyChecking no' '    UserKnownHostsFile /dev/null' \
    '    LogLevel ERROR' > "$home/.ssh/config"
  # As the image's configs (Dockerfile), ClientAlive* included: a session whose client is cut off ends
  # after ~30 s instead of staying on the host until the link returns.
  printf '%s\n' "Port $PORT" "HostKey $home/.ssh/id_rsa" "AuthorizedKeysFile $home/.ssh/authorized_keys" \
    'PidFile /tmp/sshd.pid' 'StrictModes no' 'UsePAM no' 'PasswordAuthentication no' \
    'KbdInteractiveAuthentication no' 'PermitRootLogin prohibit-password' 'UseDNS no' 'PrintMotd no' \
    'ClientAliveInterval 10' 'ClientAliveCountMax 3' \
    "SetEnv PATH=$CHECKOUT/.venv/bin:/usr/local/bin:/usr/bin:/bin" \
    > "$STATE/sshd_config"
  # uid 1000 (and root, for the fallback) get the cluster's home; only inside the hosts' mount namespaces
  awk -F: -v OFS=: -v h="$home" '$3 == 1000 || $1 == "cluster" { next } $3 == 0 { $6 = h } { print }' \
    /etc/passwd > "$STATE/passwd"
  echo "cluster:x:1000:1000:$ME:$home:/bin/bash" >> "$STATE/passwd"
  awk -F: '$3 != 1000 && $1 != "cluster"' /etc/group > "$STATE/group"
  echo "cluster:x:1000:" >> "$STATE/group"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$STATE/hosts"
  for name in "$@"; do i=$((i + 1)); printf '%s.%d\t%s\n' "$NET" $((10 + i)) "$name" >> "$STATE/hosts"; done
  chown -R 1000:1000 "$home"
  chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/id_rsa"
}

make_host() {  # INDEX NAME SHARED: namespaces, veth, mounts; appends to hosts.tsv
  local i=$1 name=$2 shared=$3 ip pid path
  ip=$NET.$((10 + i))
  [ -d /etc/netns ] || { mkdir /etc/netns && echo "rmdir /etc/netns" >> "$STATE/made"; }
  mkdir "/etc/netns/$name" && echo "/etc/netns/$name" >> "$STATE/made"
  cp "$STATE/hosts" "/etc/netns/$name/hosts"
  ip netns add "$name" && echo "netns $name" >> "$STATE/made"
  ip -n "$BRIDGE_NS" link add "v$i" type veth peer name eth0 netns "$name"
  ip -n "$BRIDGE_NS" link set "v$i" master br0 up
  ip -n "$name" addr add "$ip/24" dev eth0
  ip -n "$name" link set lo up
  ip -n "$name" link set eth0 up
  setsid nsenter --net="/run/netns/$name" -- unshare --uts --mount --propagation private -- sleep infinity \
    </dev/null >/dev/null 2>&1 &
  pid=$!; disown
  printf '%s\t%s\t%s\t%s\n' "$name" "$i" "$ip" "$pid" >> "$STATE/hosts.tsv"
  for _ in $(seq 50); do [ "$(readlink "/proc/$pid/ns/uts")" != "$(readlink /proc/$$/ns/uts)" ] && break; sleep 0.05; done
  in_host "$pid" hostname "$name"
  # Private /tmp, /dev/shm and /root (0700 on the machine; here 0755, for uid 1000 to reach a Python or
  # checkout under it); what the hosts share and lies under /tmp or /root is bound back in from the machine's.
  in_host "$pid" sh -ec "
    for top in /tmp /root; do
      [ -d \$top ] || continue
      mkdir -p '$STATE/$name.old'; mount --bind \$top '$STATE/$name.old'
      mount -t tmpfs -o mode=\$([ \$top = /tmp ] && echo 1777 || echo 755) tmpfs \$top
      for p in $(printf "'%s' " "$shared" "$CHECKOUT" "$STATE" "$PYBASE"); do
        case \"\$p\" in \$top/*) mkdir -p \"\$p\"; mount --bind \"$STATE/$name.old/\${p#\$top/}\" \"\$p\";; esac
      done
      umount -l '$STATE/$name.old'
    done
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mount --bind '/etc/netns/$name/hosts' /etc/hosts
    mount --bind '$STATE/passwd' /etc/passwd; mount --bind '$STATE/group' /etc/group"
  rmdir "$STATE/$name.old"
}

choose_user() {  # uid 1000 where it can read the checkout and write DIR, else root (why: printed)
  local pid=$1 shared=$2
  if in_host "$pid" setpriv --reuid 1000 --regid 1000 --clear-groups sh -c \
      "test -x '$CHECKOUT/.venv/bin/python' && test -r '$CHECKOUT/launcher/run.py' && test -w '$shared'" 2>/dev/null; then
    echo 1000 > "$STATE/user"
  else
    # Root fallback: uid 1000 cannot traverse to the checkout or write DIR here; root can, so the tests still run.
    echo "$ME: uid 1000 cannot read $CHECKOUT/.venv or write $shared; running the hosts' sshd and commands as root" >&2
    echo root > "$STATE/user"
    chown -R root:root "$STATE/home"  # ssh refuses a config owned by another user
    [ -d /run/sshd ] || { mkdir -p /run/sshd && echo /run/sshd >> "$STATE/made"; }  # root sshd's privsep dir
  fi
}

start_sshd() {  # NAME PID
  # shellcheck disable=SC2046
  setsid nsenter -t "$2" -u -m -n -- $(as_user) /usr/sbin/sshd -D -e -f "$STATE/sshd_config" \
    </dev/null >>"$STATE/$1.sshd.log" 2>&1 & disown
}

cmd_up() {
  need_root
  local shared="" names=() i=0 name pid first
  while [ $# -gt 0 ]; do
    case $1 in --shared) shared=${2:?--shared DIR}; shift 2;; -*) die "unknown option $1";; *) names+=("$1"); shift;; esac
  done
  [ -n "$shared" ] && [ ${#names[@]} -gt 0 ] || die "usage: up --shared DIR NAME..."
  [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing: apt-get install openssh-server (make setup does)"
  [ -e "$STATE" ] && die "a cluster is up already ($STATE); run '$0 down' first"
  for name in "${names[@]}"; do
    [[ $name =~ ^[a-z][a-z0-9-]{0,62}$ ]] || die "host name '$name': lower-case letters, digits and '-'"
    [ ! -e "/run/netns/$name" ] && [ ! -e "/etc/netns/$name" ] || die "host '$name': /run/netns or /etc/netns has it already"
  done
  [ ${#names[@]} -le 200 ] || die "at most 200 hosts"
  mkdir -p "$STATE"; : > "$STATE/made"; : > "$STATE/hosts.tsv"
  [ -n "${LOCAL_CLUSTER_KEEP:-}" ] || trap 'echo "$ME: up failed; removing what it made" >&2; cmd_down' EXIT
  if [ ! -e "$shared" ]; then mkdir -p "$shared"; chown 1000:1000 "$shared"; fi
  shared=$(cd "$shared" && pwd -P); echo "$shared" > "$STATE/shared"
  write_files "$shared" "${names[@]}"
  ip netns add "$BRIDGE_NS" && echo "netns $BRIDGE_NS" >> "$STATE/made"
  ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  for name in "${names[@]}"; do i=$((i + 1)); make_host "$i" "$name" "$shared"; done
  first=$(host_field "${names[0]}" 4)
  choose_user "$first" "$shared"
  for name in "${names[@]}"; do start_sshd "$name" "$(host_field "$name" 4)"; done
  for name in "${names[@]}"; do wait_sshd "$first" "$name"; done
  trap - EXIT
  echo "$ME: up: ${names[*]} (user $(cat "$STATE/user"), shared $shared)"
}

wait_sshd() {  # FROM_PID NAME: until `ssh NAME true` works (20 s)
  local _
  for _ in $(seq 100); do
    # shellcheck disable=SC2046
    in_host "$1" $(as_user) env HOME="$STATE/home" ssh -o ConnectTimeout=2 -- "$2" true </dev/null 2>/dev/null && return 0
    sleep 0.2
  done
  die "sshd on $2 does not answer (log: $STATE/$2.sshd.log)"
}

cmd_check() {  # every host's holder alive and its sshd answering ssh from the first host; else exit 1 naming it
  need_root
  local name pid first
  [ -f "$STATE/hosts.tsv" ] && [ -s "$STATE/hosts.tsv" ] && [ -f "$STATE/user" ] || die "no cluster is up"
  first=$(head -n1 "$STATE/hosts.tsv" | cut -f4)
  while IFS=$'\t' read -r name _ _ pid; do
    kill -0 "$pid" 2>/dev/null || die "host '$name' is gone (its holder $pid exited)"
    # shellcheck disable=SC2046
    in_host "$first" $(as_user) env HOME="$STATE/home" ssh -o ConnectTimeout=5 -o BatchMode=yes -- "$name" true \
      </dev/null >/dev/null 2>&1 || die "sshd on $name does not answer"
  done < "$STATE/hosts.tsv"
  echo "$ME: check: $(cut -f1 "$STATE/hosts.tsv" | tr '\n' ' ')answer"
}

cmd_exec() {
  local name=${1:?usage: exec NAME CMD...}; shift
  [ $# -gt 0 ] || die "usage: exec NAME CMD..."
  local pid cwd=$PWD shared user=cluster extra=()
  pid=$(host_field "$name" 4)
  kill -0 "$pid" 2>/dev/null || die "host '$name' is gone (its holder $pid exited)"
  shared=$(cat "$STATE/shared")
  case $cwd/ in "$shared"/*|"$CHECKOUT"/*) ;; *) cwd=$STATE/home;; esac
  if [ "$(cat "$STATE/user")" = root ]; then user=root; extra=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1); fi
  # shellcheck disable=SC2046
  exec nsenter -t "$pid" -u -m -n -- $(as_user) env -i HOME="$STATE/home" USER=$user LOGNAME=$user LANG=C.UTF-8 \
    PATH="$CHECKOUT/.venv/bin:/usr/local/bin:/usr/bin:/bin" "${extra[@]}" \
    bash -c 'cd "$1" && shift && exec "$@"' exec "$cwd" "$@"
}

cmd_kill() {
  need_root
  local name=${1:?usage: kill NAME}
  kill_netns "$name" "$(host_field "$name" 4)"
}

cmd_signal() {  # NAME SIGNAL: every process of the host but its holder (which exec and kill rely on)
  need_root
  local pids _
  for _ in 1 2; do  # twice: a child forked while the first round ran is caught by the second
    pids=$(netns_pids "$1" | grep -vx "$(host_field "$1" 4)" || true)
    [ -z "$pids" ] || kill "-$2" $pids 2>/dev/null || true
  done
}

cmd_link() {  # NAME up|down: the host's port on the bridge
  need_root
  ip -n "$BRIDGE_NS" link set "v$(host_field "$1" 2)" "$2"
}

cmd_down() {
  need_root
  local line what
  if [ -f "$STATE/made" ]; then
    # newest first: hosts' processes and namespaces, then the bridge namespace, then files and directories
    tac "$STATE/made" | while read -r line; do
      case $line in
        "netns "*) what=${line#netns }; kill_netns "$what"; ip netns del "$what" 2>/dev/null || true;;
        "rmdir "*) rmdir "${line#rmdir }" 2>/dev/null || true;;  # only if nothing else was put there
        /*) rm -rf "$line";;
      esac
    done
  fi
  # a cluster whose state was lost: the bridge namespace is ours by name
  if [ -e "/run/netns/$BRIDGE_NS" ]; then kill_netns "$BRIDGE_NS"; ip netns del "$BRIDGE_NS"; fi
  if [ -f "$STATE/hosts.tsv" ]; then cut -f4 "$STATE/hosts.tsv" | xargs -r kill -9 2>/dev/null || true; fi
  rm -rf "$STATE"
}

case ${1:-} in
  up) shift; cmd_up "$@";;
  exec) shift; cmd_exec "$@";;
  check) cmd_check;;
  kill) shift; cmd_kill "$@";;
  partition) cmd_link "${2:?usage: partition NAME}" down;;
  heal) cmd_link "${2:?usage: heal NAME}" up;;
  freeze) cmd_signal "${2:?usage: freeze NAME}" STOP;;
  thaw) cmd_signal "${2:?usage: thaw NAME}" CONT;;
  down) cmd_down;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2;;
esac
