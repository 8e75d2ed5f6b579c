"""Training throughput, measured side by side in one run (CPU; --threads OMP threads per np-1 process).

For each width: the model alone on one in-memory batch (forward, backward, SGD step), the
trainer (batched pipeline), the trainer with d2l's per-image DataLoader, and the
bfloat16 AMP variants; then ratios. Scaling: the trainer under horovodrun -np 2 vs -np 1.
Trainer figures are epoch 2's images/s from metrics.jsonl (epoch 1 includes warm-up).

    .venv/bin/python benchmarks/bench_train.py [--widths 16 64] [--batch-size 128] [--threads 1] [--repeats N]
                                               [--skip-amp] [--skip-scaling] [--skip-step]

To compare with figures taken at 2 threads per process (e.g. 305 img/s at width 16): --threads 2.
Scaling always uses one thread per rank: -np 2 vs -np 1, vs two independent np-1 trainers at once (the
machine's own ceiling for two processes), and with Horovod's default cycle time vs the CPU default.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.run import child_env, horovodrun_argv
from trainer.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(threads: int, **extra: str) -> dict[str, str]:
    """The launcher's child environment with `threads` OMP threads per process."""
    return child_env(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run(cmd: list[str], threads: int = 1, **extra_env: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads, **extra_env), cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def model_alone(width: int, batch: int, steps: int, amp: str, stage_mult: str = "1,2,4,8", stem_stride: int = 1,
                stem_pool: int = 0) -> float:
    """Images/s of forward+backward+step on one fixed in-memory batch (run in this process)."""
    if amp != "none":
        from mxnet.contrib import amp as mxamp

        mxamp.init(target_dtype=amp)
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon

    from trainer.device import init_horovod
    from trainer.hvd_trainer import DenseGradTrainer
    from trainer.model import resnet18

    init_horovod()
    net = resnet18(10, width, stage_mult, stem_stride, stem_pool)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True)
    trainer = DenseGradTrainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.array(np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32))
    y = mx.nd.array(np.arange(batch) % 10, dtype="float32")

    def step():
        with autograd.record():
            loss = loss_fn(net(x).astype("float32"), y)
        loss.backward()
        trainer.step(batch)
        return loss

    for _ in range(3):
        step().wait_to_read()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.wait_to_read()
    mx.nd.waitall()
    return steps * batch / (time.perf_counter() - start)


def trainer_cmd(prepared: Path, out: str, width: int, batch: int, threads: int, np_: int, *extra: str) -> list[str]:
    """The trainer's command line for 2 epochs (`threads` threads alone, one a rank under horovodrun --gloo)."""
    cmd = [str(BIN / "python"), "-m", "trainer", "--prepared", str(prepared), "--out", out,
           "--width", str(width), "--batch-size", str(batch), "--epochs", "2", "--threads", str(threads if np_ == 1 else 1), *extra]
    return horovodrun_argv(np_, cmd) if np_ > 1 else cmd


def epoch2_ips(run_dir: str) -> float:
    """Epoch 2's images/s (all ranks) from a run's metrics.jsonl (epoch 1 includes warm-up)."""
    return read_metrics(run_dir)[-1]["images_per_sec"]


def trainer_ips(prepared: Path, width: int, batch: int, threads: int, np_: int, *extra: str, **extra_env: str) -> float:
    """Epoch 2's images/s (all ranks) of the real trainer."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        run(trainer_cmd(prepared, f"{tmp}/run", width, batch, threads, np_, *extra), threads, **extra_env)
        return epoch2_ips(f"{tmp}/run")


def independent_pair_ips(prepared: Path, width: int, batch: int) -> float:
    """Two unrelated np-1 trainers at once, summed: what 2 processes get from this machine with no Horovod at all.

    The honest ceiling for -np 2 here: it includes memory-bandwidth and cache contention and both
    processes' helper threads, which -np 1 alone does not pay.
    """
    with tempfile.TemporaryDirectory(prefix="bench-pair-") as tmp:
        procs = [subprocess.Popen(trainer_cmd(prepared, f"{tmp}/run{i}", width, batch, 1, 1), env=env(1), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"independent np-1 trainer failed ({proc.returncode}):\n{err[-3000:]}")
        return sum(epoch2_ips(f"{tmp}/run{i}") for i in range(2))


def make_prepared(root: Path, n_train: int) -> Path:
    """Demo data of n_train images (10% go to valid), prepared."""
    src, prep = root / f"demo{n_train}", root / f"prep{n_train}"
    run([str(BIN / "cifar10-hvd"), "demo-data", "--out", str(src), "--train", str(n_train), "--test", "10"])
    run([str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(prep), "--layout", "folders"])
    return prep


def seed_loop(folder: str, width: int, batch: int, steps: int) -> float:
    """Images/s of the d2l chapter's own training loop: ImageFolderDataset (PNG decode every epoch) +
    transform_first + DataLoader + gluon.Trainer, as in kaggle_cifar10.md (run in this process)."""
    import mxnet as mx
    from mxnet import autograd, gluon

    from trainer.model import resnet18
    from trainer.presets import d2l_transform

    ds = gluon.data.vision.ImageFolderDataset(folder, flag=1)
    it = gluon.data.DataLoader(ds.transform_first(d2l_transform()), batch, shuffle=True, last_batch="discard")
    net = resnet18(10, width)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 5e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    done, start = 0, None
    while done < steps + 3:
        for x, y in it:
            with autograd.record():
                loss = loss_fn(net(x), y.astype("float32"))
            loss.backward()
            trainer.step(batch)
            loss.wait_to_read()
            done += 1
            if done == 3:  # warm-up steps (graph build) are not timed
                start = time.perf_counter()
            if done >= steps + 3:
                break
    return steps * batch / (time.perf_counter() - start)


def alone(width: int, batch: int, steps: int, threads: int, amp: str = "none") -> float:
    out = run([str(BIN / "python"), __file__, "--model-alone", str(width), "--batch-size", str(batch),
               "--steps", str(steps), "--amp", amp], threads)
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="OMP threads for the np-1 comparisons (not scaling)")
    p.add_argument("--repeats", type=int, default=1, help="measure each figure this often, interleaved; keep the best")
    p.add_argument("--skip-amp", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-step", action="store_true", help="only the scaling figures")
    p.add_argument("--model-alone", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed-loop", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--amp", default="none", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seed_loop:
        print(seed_loop(args.seed_loop, args.width, args.batch_size, args.steps))
        return 0
    if args.model_alone:
        print(model_alone(args.model_alone, args.batch_size, args.steps, args.amp))
        return 0

    bs, th = args.batch_size, args.threads
    print(f"CPU, {args.threads} thread(s) for np 1 (1 per rank for scaling), per-rank batch {bs}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (shared machine: figures are noisy)")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for width in [] if args.skip_step else args.widths:
            # enough steps for a steady epoch 2, without taking minutes at width 64
            n_train = bs * (24 if width <= 16 else 6) * 10 // 9 + 20
            prep = make_prepared(Path(tmp), n_train)
            steps = 24 if width <= 16 else 6
            m = t = s = f = 0.0
            for _ in range(args.repeats):  # interleaved, best of each: the machine may be shared
                m = max(m, alone(width, bs, steps, th))
                t = max(t, trainer_ips(prep, width, bs, th, 1))
                s = max(s, trainer_ips(prep, width, bs, th, 1, "--pipeline", "d2l"))
                f = max(f, float(run([str(BIN / "python"), __file__, "--seed-loop", str(prep / "train_valid_test" / "train"),
                                      "--width", str(width), "--batch-size", str(bs), "--steps", str(steps)],
                                     th).strip().splitlines()[-1]))
            print(f"width {width:3d}: model alone {m:8.1f} img/s | trainer {t:8.1f} img/s ({t / m:.2f} of model alone)"
                  f" | trainer with pipeline=d2l (in-memory) {s:8.1f} img/s ({t / s:.2f}x)"
                  f" | the seed's loop (ImageFolderDataset PNGs) {f:8.1f} img/s (trainer = {t / f:.2f}x seed)")
            if not args.skip_amp:
                mb = alone(width, bs, steps, th, "bfloat16")
                tb = trainer_ips(prep, width, bs, th, 1, "--amp", "bfloat16")
                print(f"width {width:3d} bfloat16 AMP: model alone {mb:8.1f} img/s ({mb / m:.2f}x fp32)"
                      f" | trainer {tb:8.1f} img/s ({tb / t:.2f}x fp32)")
        if not args.skip_scaling:
            width = args.widths[0]
            # 40 steps a rank at -np 2: an epoch long enough that its start and end barely count
            prep = make_prepared(Path(tmp), bs * 2 * 40 * 10 // 9 + 20)
            one = pair = two = two_default = 0.0
            for _ in range(args.repeats):
                # scaling compares one thread per rank
                one = max(one, trainer_ips(prep, width, bs, 1, 1))
                pair = max(pair, independent_pair_ips(prep, width, bs))
                two = max(two, trainer_ips(prep, width, bs, 1, 2))
                two_default = max(two_default, trainer_ips(prep, width, bs, 1, 2, HOROVOD_CYCLE_TIME="1"))
            print(f"scaling width {width}, 1 thread a rank: -np 1 {one:8.1f} img/s | two independent np-1 trainers at once "
                  f"{pair:8.1f} img/s (machine ceiling {pair / (2 * one):.0%})")
            print(f"  -np 2 (CPU default HOROVOD_CYCLE_TIME=10 ms) {two:8.1f} img/s: efficiency {two / (2 * one):.0%} "
                  f"of 2 x np 1, {two / pair:.0%} of the ceiling")
            print(f"  -np 2 (Horovod's default cycle time, 1 ms)  {two_default:8.1f} img/s: efficiency "
                  f"{two_default / (2 * one):.0%} of 2 x np 1, {two_default / pair:.0%} of the ceiling "
                  f"(10 ms is {two / two_default:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
