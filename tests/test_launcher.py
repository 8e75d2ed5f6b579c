"""cifar10-hvd run: the whole pipeline on 2 real ranks, config validation, skipping, resume, MPI-world detection."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, horovodrun, run_cli, tool_env

TINY = ["train.width=4", "train.batch_size=32", "train.eval_batch_size=128", "predict.batch_size=64",
        "train.threads=1"]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def demo_run(demo_src, tmp_path_factory):
    """The demo pipeline end to end on 2 ranks (Gloo), tiny width: the thing `make demo` runs."""
    work = tmp_path_factory.mktemp("run") / "demo"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
                    "--workdir", str(work), "--np", "2", "train.epochs=2", "train.lr_period=1", *TINY], timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return work, proc


def test_demo_pipeline_end_to_end(demo_run, demo_src):
    work, proc = demo_run
    summary = json.loads((work / "summary.json").read_text())
    assert summary["phases"] == ["prepare", "tune", "final", "predict"]
    for stage in summary["phases"]:
        assert summary["stages"][stage]["status"] == "ran"
        assert summary["stages"][stage]["wall_seconds"] > 0
    assert 0.0 <= summary["tune_valid_acc"] <= 1.0
    assert summary["stages"]["tune"]["images_per_sec"] > 0
    assert summary["stages"]["predict"]["images"] == 97
    # the horovodrun command is printed so users can copy it
    assert "horovodrun -np 2 -H localhost:2 --gloo" in proc.stdout
    with open(work / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 98))
    classes = json.loads((work / "prepared" / "manifest.json").read_text())["classes"]
    assert {r[1] for r in rows[1:]} <= set(classes)
    assert (work / "report.png").stat().st_size > 1000
    assert str(work / "submission.csv") in proc.stdout and str(work / "report.png") in proc.stdout
    for phase in ("tune", "final"):
        cfg = json.loads((work / phase / "config.json").read_text())
        assert cfg["world_size"] == 2 and cfg["phase"] == phase


def test_rerun_skips_complete_stages_and_reruns_changed_ones(demo_run, demo_src):
    work, _ = demo_run
    before = (work / "submission.csv").stat().st_mtime_ns
    args = ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
            "--workdir", str(work), "--np", "2", "train.epochs=2", "train.lr_period=1", *TINY]
    proc = run_cli(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    # nothing re-trains when nothing changed; prepare still ran, and answered "up to date" itself
    assert all(s["status"] == "skipped" for s in summary["stages"].values())
    assert "[run] prepare: " in proc.stdout and "is up to date" in proc.stderr
    assert (work / "submission.csv").stat().st_mtime_ns == before
    # a predict option changed: only predict runs again
    proc = run_cli(args + ["predict.tta=flip", "--phases", "predict"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["stages"]["predict"]["status"] == "ran"


def test_changed_train_key_reruns_tune_final_predict_not_prepare(demo_run, demo_src):
    work, _ = demo_run
    manifest = (work / "prepared" / "manifest.json").stat().st_mtime_ns
    args = ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
            "--workdir", str(work), "--np", "2", "train.epochs=1", "train.lr_period=1", *TINY]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((work / "summary.json").read_text())["stages"]
    assert {s: stages[s]["status"] for s in stages} == {"prepare": "skipped", "tune": "ran", "final": "ran",
                                                        "predict": "ran"}
    assert (work / "prepared" / "manifest.json").stat().st_mtime_ns == manifest
    for phase in ("tune", "final"):
        assert json.loads((work / phase / "config.json").read_text())["train"]["epochs"] == 1
        assert stages[phase]["epochs"] == 1


def test_path_flags_are_taken_as_given(demo_src, tmp_path):
    # flags are values, not YAML: ' #' would start a comment and ': ' a mapping if they were re-parsed
    work = tmp_path / "odd #dir: x"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
                    "--workdir", str(work), "--phases", "prepare"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["workdir"] == str(work)
    assert (work / "prepared" / "manifest.json").is_file()


def test_shipped_configs_validate():
    from launcher.run_config import load_run_config

    for path in sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "kustomization.yaml"):
        cfg = load_run_config(path)
        assert cfg.launch.np >= 1, path
    seed = load_run_config(ROOT / "configs" / "seed.yaml")
    assert (seed.train.batch_size, seed.train.epochs, seed.train.lr, seed.train.wd, seed.train.lr_period,
            seed.train.lr_decay, seed.train.width) == (128, 100, 0.1, 5e-4, 50, 0.1, 64)


def test_failing_stage_stops_the_pipeline_and_names_it(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 1}\n")
    proc = run_cli(["run", "--config", str(cfg), "--data", str(src), "--workdir", str(tmp_path / "w")])
    assert proc.returncode != 0
    assert "stage 'prepare' failed" in proc.stderr
    assert not (tmp_path / "w" / "tune").exists()


def test_killed_stage_resumes(prepared, tmp_path):
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 4, batch_size: 32, threads: 1, lr_period: 2}\n"
                                            "launch: {np: 2}\n")
    args = [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--prepared", str(prepared),
            "--workdir", str(work), "--phases", "tune"]
    proc = subprocess.Popen(args, env=tool_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = work / "tune" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt.glob("epoch-*.json")):
        assert proc.poll() is None, "run ended before writing a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {json.loads(line)["epoch"] for line in (work / "tune" / "metrics.jsonl").read_text().splitlines()}
    assert len(done) < 4, "the run finished before it could be killed"
    res = run_cli(["run", "--config", str(cfg), "--prepared", str(prepared), "--workdir", str(work),
                   "--phases", "tune", "--resume"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "tune" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in rows]
    assert len(epochs) == len(set(epochs)) == 4, epochs
    assert (work / "tune" / "model-final.params").exists()


def test_inside_an_mpi_world_runs_in_process(prepared, tmp_path):
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 1, batch_size: 32, threads: 1}\n")
    proc = horovodrun(2, [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--prepared", str(prepared),
                          "--workdir", str(work), "--phases", "tune"], timeout=600)
    assert "[run] tune: " not in proc.stdout  # printed only when it launches horovodrun itself
    cfg_out = json.loads((work / "tune" / "config.json").read_text())
    assert cfg_out["world_size"] == 2
    summary = json.loads((work / "summary.json").read_text())
    assert summary["in_mpi_world"] is True and summary["stages"]["tune"]["status"] == "ran"
    # the figures come from train()'s returned summary; they agree with the run dir's metrics
    from trainer.rundir import read_metrics

    rows = read_metrics(work / "tune")
    tune = summary["stages"]["tune"]
    assert (tune["epochs"], tune["train_loss"], tune["valid_acc"]) == (1, rows[-1]["train_loss"], rows[-1]["valid_acc"])


def test_prepare_inside_an_mpi_world_runs_once(demo_src, tmp_path):
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "prepare: {workers: 1}\n")
    proc = horovodrun(2, [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--data", str(demo_src),
                          "--workdir", str(work), "--phases", "prepare"], timeout=600)
    out = proc.stdout + proc.stderr
    assert out.count(f"prepared {work / 'prepared'}:") == 1, out[-3000:]  # one build, on one rank
    assert json.loads((work / "summary.json").read_text())["stages"]["prepare"]["images"] == 697


def test_prepare_in_an_mpi_world_rank_0_runs_it_and_decides_reruns(demo_src, tmp_path):
    """Rank 0 prepares while rank 1 waits for its verdict; on a rerun prepare (which decides itself whether it
    is up to date) again starts on rank 0 only, and every rank reports it skipped."""
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "prepare: {valid_ratio: 0.1}\n")
    cmd = [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--data", str(demo_src), "--workdir", str(work),
           "--phases", "prepare"]
    proc = horovodrun(2, cmd, timeout=300)
    out = proc.stdout + proc.stderr
    assert out.count("-m data_prep") == 1 and out.count(f"prepared {work / 'prepared'}:") == 1, out
    assert "(rank 0; the other ranks wait)" in out
    again = horovodrun(2, cmd, timeout=300)
    out = again.stdout + again.stderr
    assert out.count("prepare: up to date, skipped") == 2 and out.count("-m data_prep") == 1, out


def test_the_stages_are_declared_once_in_the_order_of_the_phases():
    from launcher.run_config import PHASES
    from launcher.stages import NAMED, STAGES

    assert [stage.name for stage in STAGES] == list(PHASES) == list(NAMED)


def mpirun(np_: int, cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """CMD on NP ranks under a real `mpirun` (Open MPI), as an MPIJob's launcher starts `cifar10-hvd run`."""
    argv = [shutil.which("mpirun", path=tool_env()["PATH"]) or "mpirun", "-np", str(np_), "--oversubscribe", *cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=tool_env(**env), cwd=ROOT)


def test_under_mpirun_rank_0_prepares_and_the_ranks_decide_without_horovod(demo_src, tmp_path):
    """Under Open MPI the launcher's decisions go over mpi4py: here Horovod cannot even be imported, and rank 0
    still prepares while rank 1 waits, and a rerun is skipped on both ranks."""
    stub = tmp_path / "no-horovod" / "horovod"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('horovod is kept out of this test: deciding under mpirun "
                                      "must not need it')\n")
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "prepare: {workers: 1}\n")
    cmd = [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--data", str(demo_src), "--workdir", str(work),
           "--phases", "prepare"]
    proc = mpirun(2, cmd, timeout=300, PYTHONPATH=str(stub.parent))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "(rank 0; the other ranks wait)" in out and out.count(f"prepared {work / 'prepared'}:") == 1, out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["in_mpi_world"] is True and summary["stages"]["prepare"]["images"] == 697
    again = mpirun(2, cmd, timeout=300, PYTHONPATH=str(stub.parent))
    out = again.stdout + again.stderr
    assert again.returncode == 0 and out.count("prepare: up to date, skipped") == 2, out[-5000:]


def test_under_mpirun_training_and_predict_run_in_process_after_the_ranks_decided(prepared, tmp_path):
    """Horovod starts in the same processes after mpi4py has joined the world (the MPI controller shares its
    MPI_COMM_WORLD), and the decisions between stages still reach every rank while Horovod runs."""
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 1, batch_size: 32, threads: 1}\n"
                                            "predict: {batch_size: 64}\n")
    proc = horovodrun(2, [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--prepared", str(prepared),
                          "--workdir", str(work), "--phases", "tune,final,predict"], controller="mpi", timeout=900)
    assert "[run] tune: " not in proc.stdout  # in-process: nothing launched again
    summary = json.loads((work / "summary.json").read_text())
    assert summary["in_mpi_world"] is True
    assert [summary["stages"][s]["status"] for s in ("tune", "final", "predict")] == ["ran"] * 3
    assert json.loads((work / "final" / "config.json").read_text())["world_size"] == 2
    assert len((work / "submission.csv").read_text().splitlines()) == 1 + 97


def test_under_mpirun_a_refusal_on_rank_0_ends_every_rank_with_its_status(prepared, tmp_path):
    """Rank 0 alone takes the workdir's lock; when another writer holds it, rank 0 refuses (exit 2) while rank 1
    already waits for its first decision: the job ends at once with rank 0's status instead of hanging."""
    from contracts.lock import lock_dir

    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 1}\n")
    with lock_dir(work, "workdir"):
        proc = mpirun(2, [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--prepared", str(prepared),
                          "--workdir", str(work), "--phases", "tune"], timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"in use by pid {os.getpid()}" in proc.stderr, proc.stderr[-3000:]
    assert not (work / "tune").exists()


def rank_pids(root: int) -> dict[int, int]:
    """{Horovod rank: pid} of the training ranks (`python -m trainer`) below process ROOT."""
    import psutil

    found = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            if p.cmdline()[1:3] == ["-m", "trainer"]:
                found[int(p.environ().get("HOROVOD_RANK", -1))] = p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_frozen_rank_is_relaunched_with_resume_and_the_run_finishes(prepared, tmp_path):
    """--max-restarts 1 on localhost: rank 1 stopped mid-run is named by rank 0's watchdog, the stage is
    relaunched with --resume on the same host (it answers) and np, finishes every epoch once, and summary.json
    records the restart; the frozen rank's whole tree was ended."""
    work = tmp_path / "w"
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 3, batch_size: 8, threads: 1, lr_period: 100}\n"
                                            "launch: {np: 2}\n")
    args = [str(BIN / "cifar10-hvd"), "run", "--config", str(cfg), "--prepared", str(prepared),
            "--workdir", str(work), "--phases", "tune", "--max-restarts", "1"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=tool_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        metrics = work / "tune" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        done = len(metrics.read_text().splitlines())
        frozen = rank_pids(proc.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "[run] restart 1/1 of stage 'tune': rank 1 on localhost lost (no heartbeat for" in text, text[-4000:]
    assert text.count("horovodrun -np 2 -H localhost:2") == 2
    resumed = int(re.search(r"resuming at epoch (\d+)", text).group(1))
    assert resumed - 1 >= done, (resumed, done)  # at most the epoch in progress was lost
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [0, 1, 2]
    (rec,) = json.loads((work / "summary.json").read_text())["restarts"]
    assert (rec["stage"], rec["hosts_before"], rec["hosts_after"], rec["np_before"], rec["np_after"]) == \
        ("tune", "localhost:2", "localhost:2", 2, 2)
    assert rec["epochs_done"] == resumed - 1 and "rank 1 on localhost" in rec["reason"]
    import psutil

    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE


def test_bad_input_inside_the_ranks_is_never_retried(prepared, tmp_path):
    """A stage whose ranks refuse their input (float16 on a CPU) exits 2 with the refusal, once, even with
    restarts allowed: nothing was lost, and running it again would refuse again."""
    cfg = write_config(tmp_path / "c.yaml", "train: {width: 4, epochs: 1, threads: 1, amp: float16}\n")
    proc = run_cli(["run", "--config", str(cfg), "--prepared", str(prepared), "--workdir", str(tmp_path / "w"),
                    "--phases", "tune", "--np", "2", "--max-restarts", "3"], timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "float16" in proc.stderr and "[run] restart" not in proc.stdout, proc.stderr[-3000:]
    assert proc.stdout.count("[run] tune: ") == 1


def test_min_np_above_np_is_refused_before_anything_runs(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "launch: {np: 2, max_restarts: 1, min_np: 3}\n")
    proc = run_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert proc.returncode == 2 and "launch.min_np 3 is more than launch.np 2" in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def lost_host_recovery(tmp_path: Path, *overrides: str):
    """A Recovery for np 3 on localhost:2 plus a host that cannot answer (lost.invalid: no such name), the
    Children its tune stage ran under, that stage's failure, and the Job it belongs to."""
    from launcher.launch import Children
    from launcher.restart import Recovery
    from launcher.run_config import load_run_config
    from launcher.stages import Job, StageFailed

    cfg = load_run_config(write_config(tmp_path / "c.yaml", "train: {width: 4}\n"),
                          ["launch.np=3", "launch.hosts=localhost:2,lost.invalid:1", "launch.max_restarts=1",
                           *overrides])
    markers = tmp_path / "w" / ".stages"
    markers.mkdir(parents=True)
    children = Children(cfg.launch, markers, hosts="localhost:2,lost.invalid:1")
    job = Job(cfg, tmp_path / "c.yaml", tmp_path / "w", tmp_path / "prepared")
    return Recovery(cfg, markers), children, StageFailed("tune", 1), job


def test_a_world_size_that_cannot_divide_the_global_batch_is_refused_naming_both(tmp_path):
    """Global batch 9 (3 a rank x np 3): once lost.invalid is gone, 2 ranks are left, which cannot split it;
    the refusal (exit 2) names both numbers and nothing is relaunched or recorded."""
    from contracts.errors import InputError

    recovery, children, failure, _ = lost_host_recovery(tmp_path, "train.batch_size=3")
    run_dir = tmp_path / "w" / "tune"
    run_dir.mkdir()
    with pytest.raises(InputError, match=r"global batch 9 is not divisible by 2") as refused:
        recovery.recover("tune", failure, children, run_dir)
    assert "cannot continue on 2 ranks (localhost:2)" in str(refused.value)
    assert recovery.records == []


def test_a_divisible_world_continues_on_the_hosts_that_answer_with_the_global_batch_kept(tmp_path):
    """Global batch 12 (4 a rank x np 3) after lost.invalid is gone: relaunched as np 2 on localhost:2 with 6 a
    rank and the run's LR (scale_lr's 3 x lr, fixed), recorded with the hosts and np before and after; the
    stage's key is the configured job's, untouched."""
    from launcher.stages import NAMED

    recovery, children, failure, job = lost_host_recovery(tmp_path, "train.batch_size=4", "train.scale_lr=true",
                                                          "train.lr=0.1")
    after = recovery.recover("tune", failure, children, None)
    assert (after.hosts, after.launch.np) == ("localhost:2", 2)
    (rec,) = recovery.records
    assert (rec["hosts_before"], rec["hosts_after"], rec["np_before"], rec["np_after"]) == \
        ("localhost:2,lost.invalid:1", "localhost:2", 3, 2)
    assert "lost.invalid does not answer ssh" in rec["reason"]
    launched = recovery.job(job, after, "tune", trains=True)
    train = launched.cfg.train
    assert (train.batch_size, train.scale_lr) == (6, False) and abs(train.lr - 0.3) < 1e-12
    assert job.cfg.train.batch_size == 4 and job.cfg.train.scale_lr
    argv = NAMED["tune"].argv(launched, tmp_path / "w" / "tune", True, False)
    assert "--resume" in argv and argv[argv.index("--batch-size") + 1] == "6"


def test_below_min_np_the_lost_host_gets_its_wait_then_the_stage_fails_naming_it(tmp_path, monkeypatch):
    from launcher import restart
    from launcher.stages import StageFailed

    monkeypatch.setattr(restart, "RETURN_WAIT", 2.0)
    monkeypatch.setattr(restart, "RETURN_POLL", 0.5)
    recovery, children, failure, _ = lost_host_recovery(tmp_path, "launch.min_np=3")
    with pytest.raises(StageFailed, match=r"lost.invalid does not answer ssh; the 2 slots left are fewer than "
                                          r"min_np 3 and lost.invalid did not answer again within 2 s"):
        recovery.recover("tune", failure, children, None)
    assert recovery.records == []
