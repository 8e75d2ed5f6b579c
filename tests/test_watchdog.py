"""trainer/watchdog.py with two real ranks under horovodrun on this machine: a frozen rank ends the job within
20 s under Gloo and Open MPI, naming it; healthy ranks that wait long (in a collective, or alone after a peer
finished) are never taken for lost. The multi-host faults are in tests/test_cluster.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

PROBE = str(ROOT / "tests" / "watchdog_probe.py")
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
DETECTION_LIMIT = 20.0  # seconds from the fault to the job's end: the figure
LIMIT = 600  # anything else: a loaded 2-core machine


def job(out: Path, controller: str, *args: str, supervised: bool = True) -> list[str]:
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}"]
    cmd += ["--mpi-args=--oversubscribe"] if controller == "mpi" else []
    cmd += [sys.executable, PROBE, str(out), *args]
    return [sys.executable, "-m", "trainer.watchdog", "--", *cmd] if supervised else cmd


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def wait_for(path: Path, proc: subprocess.Popen, limit: float = LIMIT) -> int:
    end = time.time() + limit
    while time.time() < end:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        assert proc.poll() is None, "the job ended before its ranks started"
        time.sleep(0.2)
    raise AssertionError(f"no {path} in {limit} s")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_a_frozen_rank_ends_the_job_within_20_s_naming_it(tmp_path, controller):
    """SIGSTOP of rank 1 mid-run: the job (horovodrun under the watchdog's supervisor, as `run` starts it)
    exits non-zero within 20 s, rank 0 says rank 1 sent no heartbeat, and the fault file has it."""
    fault = tmp_path / "tune.fault"
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["nice", "-n", "19", *job(tmp_path, controller, "600")], stdout=f,
                                stderr=subprocess.STDOUT, env=env(CIFAR10_HVD_FAULT_FILE=str(fault)))
    pid = 0
    try:
        pid = wait_for(tmp_path / "rank1.pid", proc)
        time.sleep(3)  # both ranks beating and stepping
        start = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            proc.wait(timeout=DETECTION_LIMIT + 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {DETECTION_LIMIT + 30:.0f} s after rank 1 froze") from None
        took = time.time() - start
    finally:
        proc.kill()
        if pid:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    text = log.read_text()
    assert proc.returncode != 0 and took < DETECTION_LIMIT, (took, text[-3000:])
    assert "rank 1 on " in text and "sent no heartbeat" in text, text[-3000:]
    rec = json.loads(fault.read_text().splitlines()[0])
    assert rec["lost_rank"] == 1 and rec["rank"] == 0 and rec["stage"] == "train", rec
    print(f"\nfrozen rank, {controller}, one host: job ended {took:.1f} s after SIGSTOP")


@pytest.mark.parametrize("mode", ["wait0", "early"])
def test_healthy_ranks_waiting_long_are_not_taken_for_lost(tmp_path, mode):
    """wait0: rank 0 is busy 20 s outside any collective (a long checkpoint or evaluation) while rank 1 waits in
    an allreduce; early: rank 1 finishes and exits while rank 0 works on alone for 20 s. Both exit 0 with no
    alarm: a waiting rank's thread keeps beating, a finished one said goodbye."""
    fault = tmp_path / "fault"
    proc = subprocess.run(["nice", "-n", "19", *job(tmp_path, "gloo", "20", mode)], capture_output=True,
                          text=True, timeout=LIMIT, env=env(CIFAR10_HVD_FAULT_FILE=str(fault)))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "sent no heartbeat" not in text and not fault.exists(), text[-3000:]
    assert "rank 0 done" in text and "rank 1 done" in text


def test_an_unusable_peer_timeout_is_refused_naming_the_variable(tmp_path):
    """CIFAR10_HVD_PEER_TIMEOUT=0.1: every rank refuses to start, naming the variable and the range."""
    proc = subprocess.run(["nice", "-n", "19", *job(tmp_path, "gloo", "1", supervised=False)], capture_output=True,
                          text=True, timeout=LIMIT, env=env(CIFAR10_HVD_PEER_TIMEOUT="0.1"))
    assert proc.returncode != 0
    assert "CIFAR10_HVD_PEER_TIMEOUT='0.1': give seconds from 3 to 3600" in proc.stdout + proc.stderr
