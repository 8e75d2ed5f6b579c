"""Safety on real processes, signals and files: run never removes what it did not write,
a signal to the launcher ends every rank, a run directory has one writer, a changed source re-runs all."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, run_cli, tool_env

from launcher.run import horovodrun_argv

pytestmark = pytest.mark.slow

TINY = ["train.width=4", "train.batch_size=32", "train.threads=1", "train.lr_period=1"]
TRAIN = ["--width", "4", "--batch-size", "32", "--threads", "1", "--lr-period", "1"]
LOCK = ".cifar10-hvd.lock"


def run_args(work: Path, prepared: Path, *extra: str) -> list[str]:
    return ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", str(prepared),
            "--workdir", str(work), "--phases", "tune", *TINY, *extra]


def start(args: list[str]) -> subprocess.Popen:
    """cifar10-hvd ARGS in the background, in a session of its own (so a test can always clean up)."""
    return subprocess.Popen([str(BIN / "cifar10-hvd"), *args], env=tool_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def proc_table() -> dict[int, tuple[int, str, str]]:
    """Every live process from /proc: pid -> (parent pid, start time, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), fields[19], cmd)
    return table


def tree(root: int) -> dict[int, tuple[str, str]]:
    """ROOT's descendants: pid -> (start time, command line)."""
    table, found, todo = proc_table(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, started, cmd) in table.items():
            if ppid == parent:
                found[pid] = (started, cmd)
                todo.append(pid)
    return found


def survivors(seen: dict[int, tuple[str, str]], marker: str) -> list[str]:
    """Processes of SEEN still alive, and any process whose command line names MARKER."""
    table = proc_table()
    left = [cmd for pid, (started, cmd) in seen.items() if pid in table and table[pid][1] == started]
    return left + [cmd for pid, (_, _, cmd) in table.items() if marker in cmd and pid != os.getpid()]


def stop_and_check(proc: subprocess.Popen, sig: int, marker: str) -> float:
    """Send SIG to the launcher alone; it must exit non-zero and leave no process of its tree. Returns seconds."""
    seen = tree(proc.pid)
    assert any("trainer" in cmd for _, cmd in seen.values()), seen  # the ranks are running
    try:
        t0 = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        while survivors(seen, marker) and time.time() - t0 < 30:
            time.sleep(0.2)
        elapsed, left = time.time() - t0, survivors(seen, marker)
    finally:
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"still running {elapsed:.1f} s after the signal: {[cmd[:160] for cmd in left]}"
    assert elapsed < 10, f"the stage's processes took {elapsed:.1f} s to end"
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), (proc.returncode, proc.stderr.read())
    return elapsed


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_never_removes_what_it_did_not_write(prepared, tmp_path):
    work = tmp_path / "W"
    photo = work / "tune" / "photos" / "a.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_text("x")
    # a missing prepared dir must be found before W/tune is touched
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", "/does/not/exist",
                    "--workdir", str(work), "--phases", "tune"])
    assert proc.returncode == 2 and "/does/not/exist" in proc.stderr, proc.stderr
    # good inputs, but W/tune is not a run directory this project wrote: refused, with or without --resume
    for extra in ([], ["--resume"]):
        proc = run_cli(run_args(work, prepared, *extra))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"{work / 'tune'}: exists and is not a run directory" in proc.stderr, proc.stderr
    assert photo.read_text() == "x"
    assert sorted(p.name for p in work.iterdir()) == ["tune"]  # nothing written beside it either


def test_replacement_is_built_beside_and_a_signal_ends_every_rank(prepared, tmp_path):
    work = tmp_path / "W"
    run_cli(run_args(work, prepared, "train.epochs=1", "launch.np=2"), check=True)
    old_model = sha(work / "tune" / "model-final.params")
    # a different config replaces the finished run: trained beside it, in W/.tune.next
    proc = start(run_args(work, prepared, "train.epochs=300", "launch.np=2"))
    try:
        wait_for("a checkpoint of the new run", lambda: list((work / ".tune.next" / "checkpoints").glob("*.json")),
                 proc)
        # one writer per workdir: a second run is refused at once, naming the first
        second = run_cli(run_args(work, prepared, "train.epochs=300", "launch.np=2"), timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"in use by pid {proc.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
        seconds = stop_and_check(proc, signal.SIGTERM, str(work))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"SIGTERM to the launcher: every rank gone after {seconds:.2f} s")
    # the finished run is untouched until a replacement is complete
    assert sha(work / "tune" / "model-final.params") == old_model and epochs(work / "tune") == [0]
    done = epochs(work / ".tune.next")
    # --resume continues the cut-off replacement, then renames it into place
    res = run_cli(run_args(work, prepared, f"train.epochs={len(done) + 1}", "launch.np=2", "--resume"), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert epochs(work / "tune") == list(range(len(done) + 1))
    assert json.loads((work / "tune" / "config.json").read_text())["train"]["epochs"] == len(done) + 1
    assert sha(work / "tune" / "model-final.params") != old_model
    assert not any(p.name.startswith(".tune.") for p in work.iterdir()), list(work.iterdir())


@pytest.mark.parametrize("sig, controller", [(signal.SIGINT, "mpi"), (signal.SIGKILL, "gloo")],
                         ids=["ctrl_c_under_mpirun", "kill_9_under_gloo"])
def test_a_signal_to_the_launcher_ends_every_rank(prepared, tmp_path, sig, controller):
    # SIGINT is handled (the whole stage tree is ended); SIGKILL cannot be caught: the kernel's parent-death
    # signal stops horovodrun, which stops its ranks
    work = tmp_path / "W"
    proc = start(run_args(work, prepared, "train.epochs=300", "launch.np=2", "--controller", controller))
    try:
        wait_for("a checkpoint", lambda: list((work / "tune" / "checkpoints").glob("*.json")), proc)
        seconds = stop_and_check(proc, sig, str(work))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{sig.name} to the launcher ({controller}): every rank gone after {seconds:.2f} s")


def test_a_rerun_does_not_train_beside_a_stage_still_running(prepared, tmp_path):
    # a stage someone else started (an earlier launcher's, a hand-run horovodrun) still writes W/tune
    work = tmp_path / "W"
    orphan = subprocess.Popen(horovodrun_argv(2, [str(BIN / "cifar10-hvd"), "train", "--prepared", str(prepared),
                                                  "--out", str(work / "tune"), "--epochs", "300", *TRAIN]),
                              env=tool_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    seen: dict = {}
    try:
        wait_for("a checkpoint", lambda: list((work / "tune" / "checkpoints").glob("*.json")), orphan)
        seen = tree(orphan.pid)
        rank0 = (work / "tune" / LOCK).read_text().split()[0].split("=")[1]
        for extra in ([], ["--resume"]):
            again = run_cli(run_args(work, prepared, "train.epochs=300", "launch.np=2", *extra), timeout=120)
            assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
            assert f"in use by pid {rank0} on host {socket.gethostname()}" in again.stderr, again.stderr
        assert not (work / ".tune.next").exists()
        assert orphan.poll() is None  # still the one writer, undisturbed
    finally:
        os.killpg(orphan.pid, signal.SIGKILL)
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        orphan.wait()
    done = epochs(work / "tune")
    assert done == sorted(set(done)), done  # each epoch once


def test_two_trainers_on_one_run_dir(prepared, tmp_path):
    out = tmp_path / "R"
    cmd = ["train", "--prepared", str(prepared), "--out", str(out), "--epochs", "5", *TRAIN]
    procs = [start(cmd), start(cmd)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, [o[1][-2000:] for o in outputs])
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert f"in use by pid {procs[winner].pid} on host {socket.gethostname()}" in outputs[loser][1], outputs[loser][1]
    assert epochs(out) == [0, 1, 2, 3, 4]


HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)  # descheduled between taking the lock and recording itself, as a loaded host does
os.ftruncate(fd, 0)
os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\\n".encode(), 0)
time.sleep(30)
"""


@pytest.mark.parametrize("before", ["new file", "a dead writer's record"])
def test_a_lock_taken_a_moment_ago_names_its_holder(tmp_path, before):
    # CI saw the loser of two simultaneous trainers report "in use by another process": it read the
    # lock file after the winner's flock and before the winner had written its pid and host into it
    # (a file left by a dead writer still names that writer in the same moment)
    from contracts.lock import Busy, acquire

    path = tmp_path / LOCK
    if before != "new file":
        dead = subprocess.Popen(["true"])
        dead.wait()
        path.write_text(f"pid={dead.pid} host={socket.gethostname()}\n")
    holder = subprocess.Popen([str(BIN / "python"), "-c", HOLDER, str(path)], text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy) as err:
            acquire(path, "run directory R")
        assert f"run directory R is in use by pid {holder.pid} on host {socket.gethostname()}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_writers_lock_does_not_block_resume(prepared, tmp_path):
    out = tmp_path / "R"
    proc = start(["train", "--prepared", str(prepared), "--out", str(out), "--epochs", "300", *TRAIN])
    try:
        wait_for("a checkpoint", lambda: list((out / "checkpoints").glob("*.json")), proc)
    finally:
        proc.kill()
        proc.wait()
    assert f"pid={proc.pid} " in (out / LOCK).read_text()  # the dead writer's lock file is still there
    done = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("epoch-*.json"))
    res = run_cli(["train", "--prepared", str(prepared), "--out", str(out), "--epochs", str(done + 1), "--resume",
                   *TRAIN], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert epochs(out) == list(range(done + 1)) and (out / "model-final.params").is_file()


def test_a_changed_source_reruns_prepare_and_every_later_stage(demo_src, tmp_path):
    src, work = tmp_path / "src", tmp_path / "W"
    shutil.copytree(demo_src, src)
    args = ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(src), "--workdir", str(work),
            "--phases", "prepare,tune", "train.epochs=1", "launch.np=1", *TINY]
    run_cli(args, check=True, timeout=600)
    images = json.loads((work / "prepared" / "manifest.json").read_text())["files"]["trainval_images.npy"]
    again = run_cli(args, check=True, timeout=600)
    stages = json.loads((work / "summary.json").read_text())["stages"]
    assert stages["prepare"]["status"] == stages["tune"]["status"] == "skipped"
    assert "is up to date" in again.stderr  # prepare itself checked (its fingerprint), quickly
    # the download replaced in place: same path, one image different
    shutil.copyfile(src / "train" / "2.png", src / "train" / "1.png")
    changed = run_cli(args, timeout=600)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    stages = json.loads((work / "summary.json").read_text())["stages"]
    assert stages["prepare"]["status"] == stages["tune"]["status"] == "ran", stages
    rebuilt = json.loads((work / "prepared" / "manifest.json").read_text())["files"]["trainval_images.npy"]
    assert rebuilt["sha256"] != images["sha256"]
    assert json.loads((work / "tune" / "config.json").read_text())["train"]["epochs"] == 1
