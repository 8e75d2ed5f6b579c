"""Checkpoints and resume on real runs and files: the optimizer state is never unpickled, every checkpoint file is
checked against the sha256 its writer recorded (a damaged newest checkpoint falls back to the newest intact one),
a resume that would change the training is refused unless asked for and then recorded, and write failures and
leftovers name their paths."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, horovodrun, run_cli, small_tmpfs

from trainer import rundir

TRAIN = ["--width", "4", "--batch-size", "16", "--lr", "0.1", "--lr-period", "1", "--threads", "1"]


def train(prepared: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["train", "--prepared", str(prepared), "--out", str(out), *TRAIN, *extra], timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_epochs(prepared, tmp_path_factory) -> Path:
    """A finished 2-epoch run (checkpoints epoch-0001 and epoch-0002); tests change copies of it."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    ok(train(prepared, out, "--epochs", "2"))
    return out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def ckpt(run: Path, epoch: int, suffix: str) -> Path:
    return rundir.checkpoint_stem(run, epoch).with_suffix(suffix)


def files_bytes(run: Path) -> dict[str, bytes]:
    """Every file of the run but the writer lock (which names the last writer's pid)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".cifar10-hvd.lock"}


def final_params(run: Path) -> bytes:
    return (run / rundir.FINAL_PARAMS).read_bytes()


# --- the optimizer state is data, never code ------------------------------------------------------------

class _Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant_pickle(run: Path, marker: Path, rehash: bool) -> None:
    """A pickle that runs a command in place of every checkpoint's optimizer state; with rehash the records'
    sha256 is rewritten to match it, as anyone who can write the run directory could."""
    crafted = pickle.dumps(_Payload(marker))
    for epoch, marker_json in rundir.list_checkpoints(run):
        ckpt(run, epoch, ".states").write_bytes(crafted)
        record = json.loads(marker_json.read_text())
        entry = record.get("files", {}).get(ckpt(run, epoch, ".states").name)
        if rehash and entry:
            import hashlib

            entry.update(sha256=hashlib.sha256(crafted).hexdigest(), bytes=len(crafted))
            marker_json.write_text(json.dumps(record))


@pytest.mark.parametrize("rehash", [False, True])
def test_a_pickle_planted_as_optimizer_state_runs_nothing_on_resume(prepared, two_epochs, tmp_path, rehash):
    run = copy_run(two_epochs, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant_pickle(run, marker, rehash)
    before = files_bytes(run)
    proc = train(prepared, run, "--epochs", "3", "--resume")
    assert not marker.exists(), "resume unpickled the planted optimizer state"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "epoch-0002.states" in proc.stderr and "epoch-0001.states" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_bytes(run) == before


# --- damaged checkpoints ----------------------------------------------------------------------------------

def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def break_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


DAMAGE = {".params": flip_bytes, ".states": truncate, ".json": break_json}


@pytest.mark.parametrize("suffix", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back_to_the_intact_one(
        prepared, two_epochs, tmp_path, suffix):
    run = copy_run(two_epochs, tmp_path / "run")
    damaged = ckpt(run, 2, suffix)
    DAMAGE[suffix](damaged)
    proc = ok(train(prepared, run, "--epochs", "2", "--resume"))
    assert damaged.name in proc.stderr and "falling back to" in proc.stderr, proc.stderr
    assert "resuming at epoch 2" in proc.stdout, proc.stdout
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]
    # the optimizer state round-trips exactly: epoch 2 redone from epoch-0001 is the uninterrupted run's
    assert final_params(run) == final_params(two_epochs)


def test_no_intact_checkpoint_is_exit_2_naming_each(prepared, two_epochs, tmp_path):
    run = copy_run(two_epochs, tmp_path / "run")
    flip_bytes(ckpt(run, 1, ".params"))
    truncate(ckpt(run, 2, ".states"))
    before = files_bytes(run)
    proc = train(prepared, run, "--epochs", "3", "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "epoch-0001.params" in proc.stderr and "epoch-0002.states" in proc.stderr, proc.stderr
    assert "no intact checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert files_bytes(run) == before


# --- a resume that changes the training -------------------------------------------------------------------

def test_a_resume_that_changes_training_keys_is_refused_naming_them(prepared, two_epochs, tmp_path):
    run = copy_run(two_epochs, tmp_path / "run")
    before = files_bytes(run)
    proc = train(prepared, run, "--epochs", "3", "--lr", "0.5", "--batch-size", "8", "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lr 0.1 -> 0.5" in proc.stderr and "batch_size" in proc.stderr and "16 -> 8" in proc.stderr, proc.stderr
    assert "--resume-with-changes" in proc.stderr
    assert files_bytes(run) == before


def test_resume_with_changes_records_each_change_and_its_epoch(prepared, two_epochs, tmp_path):
    run = copy_run(two_epochs, tmp_path / "run")
    ok(train(prepared, run, "--epochs", "3", "--lr", "0.5", "--batch-size", "8", "--resume-with-changes"))
    record = json.loads((run / "config.json").read_text())
    assert record["changes"] == [{"epoch": 2, "key": "global_batch", "old": 16, "new": 8},
                                 {"epoch": 2, "key": "lr", "old": 0.1, "new": 0.5}]
    assert record["train"]["lr"] == 0.5 and [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1, 2]
    # the history stays with later plain resumes, which compare against the newest checkpoint's values
    ok(train(prepared, run, "--epochs", "4", "--lr", "0.5", "--batch-size", "8", "--resume"))
    assert json.loads((run / "config.json").read_text())["changes"] == record["changes"]


def test_epochs_extend_a_step_schedule_but_not_one_that_decays_to_the_last_epoch(prepared, tmp_path):
    run = tmp_path / "cos"
    ok(train(prepared, run, "--epochs", "1", "--schedule", "cosine"))
    proc = train(prepared, run, "--epochs", "2", "--schedule", "cosine", "--resume")
    assert proc.returncode == 2 and "epochs 1 -> 2" in proc.stderr, proc.stderr[-3000:]
    step = tmp_path / "step"
    ok(train(prepared, step, "--epochs", "1"))
    ok(train(prepared, step, "--epochs", "2", "--resume"))


@pytest.mark.slow
def test_other_ranks_with_the_same_global_batch_resume_without_the_flag(prepared, tmp_path):
    run = tmp_path / "run"
    horovodrun(2, ["python", "-m", "trainer", "--prepared", str(prepared), "--out", str(run), *TRAIN,
                   "--batch-size", "8", "--epochs", "1"], timeout=300)
    ok(train(prepared, run, "--batch-size", "16", "--epochs", "2", "--resume"))
    assert json.loads((run / "config.json").read_text())["changes"] == []


@pytest.mark.slow
def test_run_resume_with_a_changed_key_is_refused_unless_asked(prepared, tmp_path):
    work = tmp_path / "work"
    head = ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", str(prepared), "--workdir",
            str(work), "--phases", "tune"]
    keys = ["launch.np=1", "train.width=4", "train.batch_size=32", "train.threads=1"]
    ok(run_cli([*head, *keys, "train.epochs=1"], timeout=600))
    proc = run_cli([*head, "--resume", *keys, "train.epochs=2", "train.lr=0.5"], timeout=600)
    assert proc.returncode == 2 and "lr 0.1 -> 0.5" in proc.stderr, proc.stderr[-3000:]
    ok(run_cli([*head, "--resume-with-changes", *keys, "train.epochs=2", "train.lr=0.5"], timeout=600))
    changes = json.loads((work / "tune" / "config.json").read_text())["changes"]
    assert changes == [{"epoch": 1, "key": "lr", "old": 0.1, "new": 0.5}]


# --- bad values, full disks, leftovers --------------------------------------------------------------------

def test_zero_epochs_is_refused_naming_the_key(prepared, tmp_path):
    proc = train(prepared, tmp_path / "run", "--epochs", "0")
    assert proc.returncode == 2 and "key 'epochs' must be >= 1" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path, request):
    """A small tmpfs (root only) of request.param bytes (300k: room for the run's record, not for its first
    checkpoint; 700k: for a 1-epoch run's checkpoint and final model, not for the export)."""
    with small_tmpfs(tmp_path / "disk", request.param) as mount:
        yield mount


@pytest.mark.parametrize("small_disk,epochs,named", [("300k", "2", "checkpoints/epoch-0001."),
                                                     ("700k", "1", "model-0000.params")], indirect=["small_disk"])
def test_a_full_disk_at_a_checkpoint_or_the_export_names_the_file(prepared, small_disk, epochs, named):
    run = small_disk / "run"
    proc = train(prepared, run, "--epochs", epochs)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{run}/{named}" in proc.stderr and "No space left on device" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_predict_removes_a_dead_writers_temporary(prepared, two_epochs, tmp_path):
    run = copy_run(two_epochs, tmp_path / "run")
    stale = run / f".submission.csv.tmp{dead_pid()}"
    stale.write_bytes(b"")
    other = run / f".notes.txt.tmp{dead_pid()}"  # not predict's: left alone
    other.write_bytes(b"")
    ok(run_cli(["predict", "--prepared", str(prepared), "--model", str(run), "--threads", "1"]))
    assert not stale.exists() and other.exists() and (run / "submission.csv").stat().st_size > 0
