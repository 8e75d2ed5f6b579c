"""A peer failure detector for the ranks of one Horovod job: every rank hears from every other rank each second.

Horovod's controllers notice a dead peer only when its connections close: a rank whose process is stopped
(SIGSTOP, a hung node) keeps its sockets open and its kernel keeps answering TCP keepalive, so the Open MPI
controller waits forever and Gloo's only after HOROVOD_GLOO_TIMEOUT_SECONDS. Here each rank sends a small UDP
heartbeat to every peer every INTERVAL seconds from a thread of its own, which stops when its process stops but
keeps beating while the rank computes, waits in a collective, evaluates or writes a checkpoint (MXNet's and
Horovod's calls release the GIL). A peer silent for longer than the timeout (CIFAR10_HVD_PEER_TIMEOUT, default
DEFAULT_TIMEOUT seconds) was killed, frozen or cut off: the rank says which one, appends a JSON line to the
file CIFAR10_HVD_FAULT_FILE names (when the launcher sets one), and exits with LOST_EXIT_STATUS, which ends the
job under horovodrun and mpirun alike (under mpirun it ends its host's daemon too, and supervise() below ends
an mpirun left waiting for a frozen host's daemon). A rank that ends in order says goodbye first and is not
missed.

Packets are a fixed binary format (PACKET) carrying the job's random token: anything else is ignored.
"""
from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PEER_TIMEOUT_ENV = "CIFAR10_HVD_PEER_TIMEOUT"
# What a launcher gives a stage's ranks (`cifar10-hvd run`, the MPIJob): Gloo's own timeout no longer has to
# catch a frozen peer (the watchdog does, in seconds), so it is doubled, for a healthy rank that is merely
# starved or swapping; it still ends a job whose UDP is blocked (the watchdog then only warns).
STAGE_ENV = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "60"}
FAULT_FILE_ENV = "CIFAR10_HVD_FAULT_FILE"
DEFAULT_TIMEOUT = 8.0  # seconds of silence: well above any pause of a healthy rank's thread, well inside 20 s
TIMEOUT_BOUNDS = (3.0, 3600.0)
INTERVAL = 1.0  # seconds between heartbeats
# A peer never heard from (UDP blocked between the hosts?) is warned about after this long, not declared lost:
# a job must not fail because of its watchdog.
FIRST_BEAT_GRACE = 30.0
LOST_EXIT_STATUS = 75  # EX_TEMPFAIL: the job may succeed when run again (on healthy hosts)
MAGIC = b"C10H"
PACKET = struct.Struct("!4s8sIB")  # magic, job token, sender's rank, kind
BEAT, BYE = 1, 2
MAX_ADDRESSES = 16
SIOCGIFADDR = 0x8915


@dataclass
class Peer:
    """Another rank: where it listens, and when this rank last heard from it (monotonic seconds)."""

    rank: int
    host: str
    addrs: tuple[str, ...]
    port: int
    heard: float | None = None
    gone: bool = False  # it said goodbye
    warned: bool = False  # never heard from within FIRST_BEAT_GRACE; told once


def peer_timeout() -> float:
    """CIFAR10_HVD_PEER_TIMEOUT (seconds) or DEFAULT_TIMEOUT; InputError naming the variable when unusable."""
    from contracts.errors import InputError

    raw = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    low, high = TIMEOUT_BOUNDS
    if not low <= value <= high:  # nan fails too
        raise InputError(f"{PEER_TIMEOUT_ENV}={raw[:40]!r}: give seconds from {low:.0f} to {high:.0f}")
    return value


def host_label() -> str:
    """The name horovodrun gave this host (HOROVOD_HOSTNAME), else its hostname: what messages call it."""
    return (os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname())[:255]


def ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, one per interface, loopback only when there is nothing else."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                found.append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]))
            except OSError:  # no IPv4 address on it
                continue
    outside = [a for a in dict.fromkeys(found) if not ipaddress.IPv4Address(a).is_loopback]
    return (outside or ["127.0.0.1"])[:MAX_ADDRESSES]


def parse_table(table: list, size: int) -> tuple[bytes, list[Peer]]:
    """The job's token (rank 0's) and every rank's Peer, from the allgathered records; checked, as they steer
    where this rank sends packets."""
    if len(table) != size:
        raise RuntimeError(f"watchdog: {len(table)} records for {size} ranks")
    token = table[0].get("token") if isinstance(table[0], dict) else None
    if not isinstance(token, bytes) or len(token) != 8:
        raise RuntimeError("watchdog: rank 0 sent no 8-byte job token")
    peers = []
    for rank, rec in enumerate(table):
        addrs = tuple(str(ipaddress.IPv4Address(a)) for a in rec["addrs"][:MAX_ADDRESSES])
        port = int(rec["port"])
        if int(rec["rank"]) != rank or not 0 < port < 65536 or not addrs:
            raise RuntimeError(f"watchdog: bad record for rank {rank}: {rec!r:.200}")
        peers.append(Peer(rank, str(rec["host"])[:255], addrs, port))
    return token, peers


class Watchdog:
    """The heartbeat thread of one rank: sends, listens, judges (see the module's docstring)."""

    def __init__(self, sock: socket.socket, rank: int, token: bytes, peers: list[Peer], timeout: float, stage: str):
        self.sock, self.rank, self.token, self.timeout, self.stage = sock, rank, token, timeout, stage
        self.peers = {p.rank: p for p in peers if p.rank != rank}
        self.pid = os.getpid()  # a forked child inherits atexit handlers, but it is not this rank
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.longest_pause, self.paused_peer = 0.0, -1  # the longest silence of a peer that spoke again
        self.thread = threading.Thread(target=self.loop, name="cifar10-hvd-watchdog", daemon=True)

    def send(self, kind: int) -> None:
        packet = PACKET.pack(MAGIC, self.token, self.rank, kind)
        for peer in self.peers.values():
            for addr in peer.addrs:
                try:
                    self.sock.sendto(packet, (addr, peer.port))
                except OSError:  # unreachable now; silence is what the peer judges by
                    pass

    def receive(self, wait: float) -> None:
        """Every packet that arrives within WAIT seconds (and all already queued); only valid ones count."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, wait))
        while ready:
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                return
            if len(data) != PACKET.size:
                continue
            magic, token, rank, kind = PACKET.unpack(data)
            peer = self.peers.get(rank)
            if magic != MAGIC or token != self.token or peer is None or kind not in (BEAT, BYE):
                continue
            now = time.monotonic()
            if peer.heard is not None and now - peer.heard > self.longest_pause:
                self.longest_pause, self.paused_peer = now - peer.heard, rank
            peer.heard, peer.gone = now, peer.gone or kind == BYE

    def silent(self, now: float) -> list[tuple[Peer, float]]:
        """The peers not heard from for longer than the timeout, with their silence; warns (once) about a peer
        never heard from at all."""
        lost = []
        for peer in self.peers.values():
            if peer.gone:
                continue
            if peer.heard is None:
                if now - self.started > FIRST_BEAT_GRACE and not peer.warned:
                    peer.warned = True
                    self.say(f"no heartbeat from rank {peer.rank} on {peer.host} ({', '.join(peer.addrs)} UDP port "
                             f"{peer.port}) in {FIRST_BEAT_GRACE:.0f} s: is UDP blocked between the hosts? That rank "
                             "is not watched; a freeze of it would go unnoticed")
            elif now - peer.heard > self.timeout:
                lost.append((peer, now - peer.heard))
        return lost

    def loop(self) -> None:
        next_beat, last_turn = 0.0, time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.send(BEAT)
                next_beat = now + INTERVAL
            self.receive(next_beat - now)
            now = time.monotonic()
            if now - last_turn > self.timeout / 2:
                # This thread itself was held up (the process stopped or starved): the silence was ours to
                # see, not the peers'. What they sent meanwhile was read above; count afresh from here.
                for peer in self.peers.values():
                    peer.heard = now if peer.heard is not None else None
            last_turn = now
            lost = self.silent(now)
            if lost:
                self.end(lost)

    def say(self, message: str) -> None:
        print(f"[rank {self.rank}] cifar10-hvd {self.stage}: {message}", file=sys.stderr, flush=True)

    def end(self, lost: list[tuple[Peer, float]]) -> None:
        """Name the lost peers, record them in the fault file, and end this rank (the job follows)."""
        for peer, silence in lost:
            self.say(f"rank {peer.rank} on {peer.host} sent no heartbeat for {silence:.0f} s "
                     "(killed, frozen or cut off); ending the job")
            self.record(peer, silence)
        self.send(BYE)  # the other ranks judge the lost peer themselves, not this one leaving
        end_host_daemon()
        os._exit(LOST_EXIT_STATUS)

    def record(self, peer: Peer, silence: float) -> None:
        """One JSON line in the fault file (one write with O_APPEND: ranks on several hosts may share it)."""
        path = os.environ.get(FAULT_FILE_ENV)
        if not path:
            return
        line = json.dumps({"stage": self.stage, "rank": self.rank, "lost_rank": peer.rank, "lost_host": peer.host,
                           "silent_seconds": round(silence, 1), "timeout": self.timeout, "time": time.time()})
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            self.say(f"cannot record the fault in {path}: {e}")

    def stop(self) -> None:
        """An orderly end: goodbye to every peer (thrice: UDP may drop one), then the thread ends."""
        if os.getpid() != self.pid or self.stopping.is_set():
            return
        self.stopping.set()
        for _ in range(3):
            self.send(BYE)
        if self.longest_pause > 2 * INTERVAL:  # how near a healthy job came to the timeout
            peer = self.peers[self.paused_peer]
            self.say(f"longest silence of a peer: {self.longest_pause:.1f} s (rank {peer.rank} on {peer.host}); "
                     f"a peer is lost after {self.timeout:.0f} s")


def end_host_daemon() -> None:
    """Under mpirun, end this host's Open MPI daemon (the rank's parent, orted) too: on a host cut off from
    mpirun it would retry reporting the rank's exit for TCP's retransmission time (~15 min), and stay."""
    ppid = os.getppid()
    try:
        comm = Path(f"/proc/{ppid}/comm").read_text().strip()
    except OSError:
        return
    if comm == "orted":
        time.sleep(0.5)  # the rank's last lines reach mpirun through the daemon
        try:
            os.kill(ppid, signal.SIGKILL)
        except OSError:
            pass


_current: Watchdog | None = None


def start(hvd, stage: str) -> Watchdog | None:
    """Start this rank's watchdog (once per process; a later call renames the stage its messages name).
    A collective: every rank calls it at the same point, right after hvd.init(). None for a single rank."""
    global _current
    if _current is not None:
        _current.stage = stage
        return _current
    if hvd.size() == 1:
        return None
    timeout = peer_timeout()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a stalled thread's backlog of beats
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    me = {"rank": hvd.rank(), "host": host_label(), "addrs": ipv4_addresses(), "port": sock.getsockname()[1],
          "token": os.urandom(8) if hvd.rank() == 0 else b""}
    token, peers = parse_table(hvd.allgather_object(me, name="cifar10_hvd.watchdog"), hvd.size())
    _current = Watchdog(sock, hvd.rank(), token, peers, timeout, stage)
    atexit.register(_current.stop)
    _current.thread.start()
    return _current


def current() -> Watchdog | None:
    """This process's watchdog, if one started."""
    return _current


def goodbye() -> None:
    """For a rank about to leave with os._exit (no atexit): tell the peers, so they are not told it was lost."""
    if _current is not None:
        _current.stop()


# -- the launcher's side --------------------------------------------------------------------------------
# mpirun ends a job whose rank failed only once every host's daemon confirms its ranks ended; the daemon of a
# frozen host never does, so mpirun waits forever after the watchdog has ended the healthy ranks. The command
# that launched the ranks is therefore run under supervise(), which ends it once a fault is recorded.
SUPERVISE_GRACE = 2.0  # seconds the launched command gets to end by itself after the first fault line


def supervised(cmd: list[str]) -> list[str]:
    """CMD (horovodrun, mpirun) run under this module's supervise(): `python -m trainer.watchdog -- CMD`."""
    return [sys.executable, "-m", "trainer.watchdog", "--", *cmd]


def fault_lines(path: str, start: int) -> list[dict]:
    """The JSON lines written to PATH past byte START (the size it had when the command started); bounded."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            blob = f.read(1 << 16)
    except OSError:
        return []
    lines = []
    for raw in blob.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            lines.append(rec)
    return lines


def end_tree(proc) -> None:
    """SIGKILL PROC and every process below it (mpirun's ssh sessions, horovodrun's middlemen)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def supervise(cmd: list[str]) -> int:
    """Run CMD; once a rank records a lost peer in CIFAR10_HVD_FAULT_FILE and CMD has not ended SUPERVISE_GRACE
    seconds later, end CMD's whole tree and return LOST_EXIT_STATUS. Otherwise CMD's own exit status."""
    import subprocess

    path = os.environ.get(FAULT_FILE_ENV, "")
    try:
        start = os.path.getsize(path) if path else 0
    except OSError:
        start = 0
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # the launcher's end: CMD ends the job in order
    deadline = None
    while proc.poll() is None:
        time.sleep(0.25)
        if deadline is None and path and fault_lines(path, start):
            deadline = time.monotonic() + SUPERVISE_GRACE
        if deadline is not None and time.monotonic() > deadline and proc.poll() is None:
            rec = fault_lines(path, start)[0]
            print(f"cifar10-hvd {str(rec.get('stage', ''))[:40]}: rank {rec.get('lost_rank')} on "
                  f"{str(rec.get('lost_host'))[:255]} was lost and {Path(cmd[0]).name} had not ended the job "
                  f"{SUPERVISE_GRACE:.0f} s later (a frozen host's daemon never confirms); ended it",
                  file=sys.stderr, flush=True)
            end_tree(proc)
            return LOST_EXIT_STATUS
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def main(argv: list[str]) -> int:
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: python -m trainer.watchdog -- CMD...", file=sys.stderr)
        return 2
    return supervise(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
