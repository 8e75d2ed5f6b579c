"""Outside an MPI world `cifar10-hvd run` starts each stage as a child process: one process, or every rank
of it under horovodrun (the exact command is printed so it can be copied). A rank that ends on bad input
leaves its message in a file the launcher names, so the stage's failure says why and exits 2 as the stage did.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from contracts.errors import INPUT_ERROR_FILE, InputError
from launcher import child
from launcher.run_config import LaunchConfig, parse_hostfile, parse_hosts
from launcher.stages import StageFailed
from trainer.watchdog import FAULT_FILE_ENV, STAGE_ENV, supervised


def horovodrun_argv(np_: int, cmd: list[str], controller: str = "gloo", hosts: str = "", hostfile: str = "") -> list[str]:
    """horovodrun -np N (-H HOSTS | --hostfile F | -H localhost:N) --gloo|--mpi CMD (the venv's horovodrun).

    On localhost under MPI, --oversubscribe lets -np exceed the core count, as Gloo allows.
    """
    argv = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_)]
    if hosts:
        argv += ["-H", hosts, f"--{controller}"]
    elif hostfile:
        argv += ["--hostfile", hostfile, f"--{controller}"]
    else:
        argv += ["-H", f"localhost:{np_}", f"--{controller}"] + (["--mpi-args=--oversubscribe"] if controller == "mpi" else [])
    return argv + list(cmd)


# A node lost without a word (cable cut, kernel panic) ends an MPI job only when Open MPI's daemons notice,
# through TCP keepalive: 300 s + 9 probes x 20 s by default, while its orted and ranks hang on. These make it
# about 20 s (a partitioned host's orted then ends its ranks too). Gloo's peers time out on their own
# (HOROVOD_GLOO_TIMEOUT_SECONDS, trainer.watchdog.STAGE_ENV). The ranks' watchdog ends the job sooner still.
MPI_KEEPALIVE = {"OMPI_MCA_oob_tcp_keepalive_time": "10", "OMPI_MCA_oob_tcp_keepalive_intvl": "3",
                 "OMPI_MCA_oob_tcp_keepalive_probes": "3"}


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: the venv first on PATH, Open MPI allowed to run as root
    (containers and CI run as root; Open MPI refuses unless told) and told to notice lost nodes
    (MPI_KEEPALIVE; a value set by the user wins), then extra."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    for key, value in {**MPI_KEEPALIVE, **STAGE_ENV}.items():  # STAGE_ENV: trainer.watchdog's
        env.setdefault(key, value)
    env.update(extra)
    return env


class HostUnreachable(RuntimeError):
    """A host of -H / --hostfile does not answer ssh: the job cannot start there."""


def launch_hosts(launch: LaunchConfig) -> list[tuple[str, int | None]]:
    """LAUNCH's hosts as (name, slots or None): -H's entries, else the hostfile's (read and checked now)."""
    if launch.hosts:
        return parse_hosts(launch.hosts)
    return parse_hostfile(launch.hostfile) if launch.hostfile else []


def horovodrun_hosts(launch: LaunchConfig, hosts: list[tuple[str, int | None]]) -> str:
    """horovodrun's -H value for HOSTS ('' for none: localhost), every slot count written out (1 where none is
    given, as mpirun counts a bare host), cut to the first np slots. A hostfile's hosts go as -H too: horovodrun's own hostfile reader
    takes no comments, blank lines or HOST:SLOTS. InputError when horovodrun cannot place np ranks on them."""
    if not hosts:
        return ""
    where = f"hosts {launch.hosts!r}" if launch.hosts else f"hostfile {launch.hostfile}"
    ipv6 = [name for name, _ in hosts if ":" in name]
    if ipv6:
        raise InputError(f"{where}: horovodrun -H takes host names and IPv4 addresses, not the IPv6 address "
                          f"{ipv6[0]}; give that host a name (e.g. in /etc/hosts)")
    slots = sum(n or 1 for _, n in hosts)
    if launch.np > slots:
        raise InputError(f"{launch.np} ranks (np) do not fit the {slots} slots of {where}; lower np or give "
                          "the hosts more slots (HOST:SLOTS)")
    return ",".join(f"{name}:{n}" for name, n in first_slots(hosts, launch.np))


def first_slots(hosts: list[tuple[str, int | None]], np_: int) -> list[tuple[str, int]]:
    """The hosts' first NP slots, in order: horovodrun --gloo starts a rank on every slot -H lists."""
    taken = []
    for name, n in hosts:
        if np_ <= 0:
            break
        take = min(n or 1, np_)
        taken.append((name, take))
        np_ -= take
    return taken


def remote_hosts(names: list[str]) -> list[str]:
    """The hosts among NAMES that horovodrun reaches over ssh: all but this one, each once."""
    local = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    return [h for h in dict.fromkeys(names) if h not in local]


def check_hosts(hosts: list[str], timeout: float = 20) -> None:
    """Raise HostUnreachable naming each host that `ssh HOST true` cannot reach (all tried at once),
    so a down host fails the run in seconds, before anything is written, not at the first horovodrun.
    `--` ends ssh's options: whatever a host name holds, ssh takes it as the host."""
    def probe(host: str) -> str | None:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=no",
               "--", host, "true"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{host} (no answer in {timeout:.0f} s)"
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return None if proc.returncode == 0 else f"{host} ({last})"

    with ThreadPoolExecutor(max_workers=min(32, len(hosts) or 1)) as pool:
        failed = [f for f in pool.map(probe, hosts) if f]
    if failed:
        raise HostUnreachable("cannot reach " + "; ".join(failed) + " over ssh; nothing was started or written")


def read_input_error(report: Path) -> str:
    """The first line a rank wrote to REPORT (INPUT_ERROR_FILE) when it ended on bad input; '' if none did."""
    try:
        with open(report, errors="replace") as f:
            return f.readline(4096).strip() or "bad input (see the messages above)"
    except OSError:
        return ""


@dataclass
class Children:
    """Starts stages as children of the launcher: one process, or every rank under horovodrun."""

    launch: LaunchConfig
    markers: Path  # WORKDIR/.stages, which every host of the job shares: ranks leave bad-input messages there
    hosts: str = ""  # horovodrun's -H (check); '' for localhost:NP

    def check(self) -> None:
        """Before anything is written (the lock included): the hosts horovodrun will get (a hostfile read and
        checked) and every remote one answering ssh."""
        hosts = launch_hosts(self.launch)
        self.hosts = horovodrun_hosts(self.launch, hosts)
        check_hosts(remote_hosts([name for name, _ in hosts]))

    def run(self, stage: str, cmd: list[str], every_rank: bool) -> None:
        """Run CMD (under horovodrun when EVERY_RANK) as the stage's child, printed so it can be copied;
        StageFailed unless it exits 0, with status 2 when a rank ended on bad input (horovodrun itself
        exits 1 for any failed rank)."""
        if every_rank:
            # supervised: ended once a rank records a lost peer (mpirun waits forever on a frozen host)
            cmd = supervised(horovodrun_argv(self.launch.np, cmd, self.launch.controller, self.hosts))
        print(f"[run] {stage}: {shlex.join(cmd)}", flush=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        report = self.markers / f"{stage}.input-error"
        report.unlink(missing_ok=True)
        fault = self.markers / f"{stage}.fault"  # a rank's watchdog names a lost peer here (JSON lines)
        fault.unlink(missing_ok=True)
        code = child.call(cmd, env=child_env(**{INPUT_ERROR_FILE: str(report), FAULT_FILE_ENV: str(fault)}))
        reason = read_input_error(report) if code else ""
        report.unlink(missing_ok=True)
        if code:
            raise StageFailed(stage, InputError.exit_status if reason else code, reason)
