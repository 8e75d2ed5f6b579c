"""The trainer end to end under real horovodrun launches on tiny demo data (width 4)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports mxnet

import pytest
from conftest import BIN, ROOT, horovodrun, run_cli, tool_env
from PIL import Image

from launcher.run import horovodrun_argv
from trainer import rundir

pytestmark = pytest.mark.slow

TINY = ["--width", "4", "--batch-size", "16", "--lr", "0.1", "--lr-period", "1", "--lr-decay", "0.5"]


def train_cmd(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["python", "-m", "trainer", "--prepared", str(prepared), "--out", str(out), *TINY, *extra]


def crcs(output: str) -> list[str]:
    """The per-rank parameter checksums rank 0 logs at the end."""
    found = re.findall(r"param crc32 by rank: ([0-9a-f ]+)", output)
    assert found, output[-3000:]
    return found[-1].split()


@pytest.fixture(scope="module")
def two_rank_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    proc = horovodrun(2, train_cmd(prepared, out, "--epochs", "2", "--keep-checkpoints", "1"))
    return out, proc


def test_ranks_end_identical_and_only_rank0_talks(two_rank_run):
    out, proc = two_rank_run
    ranks = crcs(proc.stdout)
    assert len(ranks) == 2 and len(set(ranks)) == 1
    assert "[1]<stdout>" not in proc.stdout
    assert "world size 2" in proc.stdout and "global batch 32" in proc.stdout


def test_metrics_schedule_and_shards(two_rank_run, prepared):
    import data_prep

    out, _ = two_rank_run
    recs = rundir.read_metrics(out)
    assert [r["epoch"] for r in recs] == [0, 1]
    assert [r["lr"] for r in recs] == pytest.approx([0.1, 0.05])
    n_train = len(data_prep.open_split(prepared, "train").images)
    for r in recs:
        assert r["phase"] == "tune" and r["steps_per_rank"] == [n_train // 32] * 2
        assert 0 <= r["train_acc"] <= 1 and r["train_loss"] > 0 and r["images_per_sec"] > 0
        assert r["epoch_seconds"] > 0 and 0 <= r["valid_acc"] <= 1
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"
    cfg = rundir.read_run_config(out)
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 32 and cfg["lr"] == 0.1 and cfg["phase"] == "tune"
    assert cfg["train"]["width"] == 4 and len(cfg["classes"]) == 10 and "mxnet" in cfg["versions"]
    assert [e for e, _ in rundir.list_checkpoints(out)] == [2]  # keep_checkpoints 1
    for name in ("model-final.params", "model-symbol.json", "model-0000.params"):
        assert (out / name).stat().st_size > 0


def test_allreduced_valid_accuracy_equals_one_process_evaluation(two_rank_run, prepared):
    import mxnet as mx

    import data_prep
    from trainer.evaluate import evaluate
    from trainer.model import resnet18

    out, _ = two_rank_run
    net = resnet18(10, 4)
    net.load_parameters(str(rundir.find_model_params(out)), ctx=mx.cpu())
    valid = data_prep.open_split(prepared, "valid")
    result = evaluate(net, valid.images, valid.labels, mx.cpu(), batch_size=7)
    last = rundir.read_metrics(out)[-1]
    assert result["total"] == len(valid.images)
    assert result["acc"] == last["valid_acc"]
    assert result["loss"] == pytest.approx(last["valid_loss"], rel=1e-4)


def rank_pid(out: Path, rank: int) -> int | None:
    """The pid of our trainer process with HOROVOD_RANK=rank writing to out."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"trainer" not in cmd or str(out).encode() not in cmd:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_dead_rank_fails_the_job_and_resume_continues(prepared, tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen(horovodrun_argv(2, train_cmd(prepared, out, "--epochs", "40")),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env(), cwd=ROOT,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not rundir.list_checkpoints(out):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        pid = rank_pid(out, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        log, _ = job.communicate(timeout=60)
        assert job.returncode != 0
        assert time.monotonic() - killed_at < 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    done = rundir.list_checkpoints(out)[-1][0]
    assert 1 <= done < 40

    resumed = horovodrun(2, train_cmd(prepared, out, "--epochs", str(done + 1), "--resume"))
    assert f"resuming at epoch {done + 1}" in resumed.stdout
    recs = rundir.read_metrics(out)
    assert [r["epoch"] for r in recs] == list(range(done + 1))
    assert [r["lr"] for r in recs] == pytest.approx([0.1 * 0.5 ** e for e in range(done + 1)])
    assert len(set(crcs(resumed.stdout))) == 1 and (out / "model-final.params").exists()

    # a finished run extends with a larger --epochs, appending to metrics.jsonl
    extended = horovodrun(2, train_cmd(prepared, out, "--epochs", str(done + 2), "--resume"))
    assert f"resuming at epoch {done + 2}" in extended.stdout
    recs = rundir.read_metrics(out)
    assert [r["epoch"] for r in recs] == list(range(done + 2))
    assert recs[-1]["lr"] == pytest.approx(0.1 * 0.5 ** (done + 1))


def test_eight_ranks_on_two_cores_final_phase(prepared, tmp_path):
    out = tmp_path / "run"
    proc = horovodrun(8, train_cmd(prepared, out, "--epochs", "1", "--batch-size", "8", "--phase", "final"),
                      timeout=400)
    ranks = crcs(proc.stdout)
    assert len(ranks) == 8 and len(set(ranks)) == 1
    (rec,) = rundir.read_metrics(out)
    assert rec["phase"] == "final" and rec["valid_acc"] is None and len(rec["steps_per_rank"]) == 8
    assert json.loads((out / "config.json").read_text())["world_size"] == 8


def test_config_errors_name_the_key(prepared, tmp_path, capsys):
    from trainer.train import main  # in-process: a config error never reaches horovod or mxnet

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  widht: 4\n")
    assert main(["--prepared", str(prepared), "--out", str(tmp_path / "a"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "widht" in err and str(cfg) in err
    cfg.write_text("train:\n  lr: fast\n")
    assert main(["--prepared", str(prepared), "--out", str(tmp_path / "a"), "--config", str(cfg)]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["--prepared", str(prepared), "--out", str(tmp_path / "a"), "--epochs", "x"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_existing_run_needs_resume_and_missing_data_is_exit_2(prepared, tmp_path, two_rank_run):
    out, _ = two_rank_run
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(out), "--width", "4", "--epochs", "1"])
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = run_cli(["train", *train_cmd(prepared, out, "--resume", "--phase", "final")[3:]])
    assert proc.returncode == 2 and "--phase final" in proc.stderr
    proc = run_cli(["train", *train_cmd(prepared, out, "--resume", "--width", "8")[3:]])
    assert proc.returncode == 2 and "epoch-0002.params" in proc.stderr and "width 8" in proc.stderr
    proc = run_cli(["train", "--prepared", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_d2l_pipeline_single_process(prepared, tmp_path):
    """d2l's per-image DataLoader stays runnable as a config, here in a plain single process."""
    out = tmp_path / "run"
    run_cli(["train", *train_cmd(prepared, out, "--epochs", "1", "--pipeline", "d2l")[3:]], check=True)
    (rec,) = rundir.read_metrics(out)
    assert rec["steps_per_rank"] == [540 // 16] and rundir.read_run_config(out)["world_size"] == 1


@pytest.mark.parametrize("preset, expected", [(None, "10"), ("3", "3")])
def test_cpu_ranks_default_the_horovod_cycle_time(tmp_path, monkeypatch, preset, expected):
    # Horovod reads HOROVOD_CYCLE_TIME in hvd.init(); a user's value (or horovodrun --cycle-time-ms) must win
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    script = tmp_path / "cycle.py"
    script.write_text("import os\nfrom trainer.device import init_horovod\nhvd = init_horovod()\n"
                      "print(f\"rank {hvd.rank()} cycle {os.environ['HOROVOD_CYCLE_TIME']}\", flush=True)\n")
    env = {} if preset is None else {"HOROVOD_CYCLE_TIME": preset}
    proc = horovodrun(2, [str(BIN / "python"), str(script)], timeout=120, **env)
    for rank in (0, 1):
        assert f"rank {rank} cycle {expected}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_one_averaged_step_on_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    """Each of 2 ranks steps on its half of 8 rows; the averaged step equals 1 rank stepping on all 8."""
    import numpy as np

    script = str(ROOT / "tests" / "hvd_step.py")
    horovodrun(2, ["python", script, str(tmp_path / "two.npz")], timeout=300)
    horovodrun(1, ["python", script, str(tmp_path / "one.npz")], timeout=300)
    horovodrun(1, ["python", script, str(tmp_path / "half.npz"), "4"], timeout=300)
    two, one, half = (dict(np.load(tmp_path / f"{n}.npz")) for n in ("two", "one", "half"))
    names = [k for k in one if k.startswith("after/")]
    assert names and sorted(names) == sorted(k for k in two if k.startswith("after/"))
    for k in names:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the step moved the parameters, and a step on rank 0's half alone lands elsewhere: the gradients were averaged
    assert any(not np.allclose(one[k], one[k.replace("after/", "before/")]) for k in names)
    assert any(not np.allclose(two[k], half[k], rtol=1e-4, atol=1e-5) for k in names)
