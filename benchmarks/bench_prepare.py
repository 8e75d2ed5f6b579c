"""Benchmark: the seed's reorganisation (shutil copies into class folders) vs `prepare`, side by side.

    .venv/bin/python benchmarks/bench_prepare.py                    # 50,000 train + 50,000 test
    .venv/bin/python benchmarks/bench_prepare.py --test 300000      # the competition's test size (memory)

The dataset is generated once with ../shared/data/make_kaggle_cifar10.py and cached under --work.
Each side runs in its own process, so its peak resident memory (ru_maxrss of itself and of its
children, the decode workers) and CPU time (user + system, all processes) are its own. On a shared
machine the wall-clock ratio moves with the load; CPU time moves much less. Both read the same cached source; the seed side runs
first, so neither reads from a cold disk. Images/s counts source images (train + test) per second.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT.parent / "shared" / "data" / "make_kaggle_cifar10.py"


# --- the seed (d2l "Kaggle CIFAR-10" chapter), re-expressed with an explicit output folder -------------
def read_csv_labels(fname: str) -> dict[str, str]:
    """Read fname to return a name to label dictionary."""
    with open(fname) as f:
        lines = f.readlines()[1:]
    tokens = [line.rstrip().split(",") for line in lines]
    return dict((name, label) for name, label in tokens)


def mkdir_if_not_exist(path: str) -> None:
    """d2l.mkdir_if_not_exist."""
    if not os.path.exists(path):
        os.makedirs(path)


def copyfile(filename: str, target_dir: str) -> None:
    """Copy a file into a target directory."""
    mkdir_if_not_exist(target_dir)
    shutil.copy(filename, target_dir)


def reorg_train_valid(data_dir: str, out_dir: str, labels: dict[str, str], valid_ratio: float) -> int:
    n = collections.Counter(labels.values()).most_common()[-1][1]
    n_valid_per_label = max(1, math.floor(n * valid_ratio))
    label_count: dict[str, int] = {}
    for train_file in os.listdir(os.path.join(data_dir, "train")):
        label = labels[train_file.split(".")[0]]
        fname = os.path.join(data_dir, "train", train_file)
        copyfile(fname, os.path.join(out_dir, "train_valid_test", "train_valid", label))
        if label not in label_count or label_count[label] < n_valid_per_label:
            copyfile(fname, os.path.join(out_dir, "train_valid_test", "valid", label))
            label_count[label] = label_count.get(label, 0) + 1
        else:
            copyfile(fname, os.path.join(out_dir, "train_valid_test", "train", label))
    return n_valid_per_label


def reorg_test(data_dir: str, out_dir: str) -> None:
    for test_file in os.listdir(os.path.join(data_dir, "test")):
        copyfile(os.path.join(data_dir, "test", test_file), os.path.join(out_dir, "train_valid_test", "test", "unknown"))


def seed_way(src: Path, out: Path, valid_ratio: float) -> None:
    labels = read_csv_labels(str(src / "trainLabels.csv"))
    reorg_train_valid(str(src), str(out), labels, valid_ratio)
    reorg_test(str(src), str(out))


# --- measurement -------------------------------------------------------------------------------------
def measure(side: str, src: Path, out: Path, workers: int) -> None:
    """Run one side in this process and print its wall time and peak memory as JSON."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if side == "seed":
        seed_way(src, out, 0.1)
    else:
        import data_prep

        data_prep.prepare(src, out, workers=workers)
    seconds = time.perf_counter() - started
    usage = {"self": resource.getrusage(resource.RUSAGE_SELF), "children": resource.getrusage(resource.RUSAGE_CHILDREN)}
    rss = {who: u.ru_maxrss * 1024 for who, u in usage.items()}
    cpu = sum(u.ru_utime + u.ru_stime for u in usage.values())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss": rss}))


def run_side(side: str, src: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", side, "--src", str(src), "--out", str(out),
                           "--workers", str(workers)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dataset(work: Path, n_train: int, n_test: int) -> Path:
    """The cached Kaggle-layout dataset, generated on first use."""
    src = work / f"kaggle-{n_train}-{n_test}"
    if (src / "sampleSubmission.csv").is_file():
        return src
    shutil.rmtree(src, ignore_errors=True)
    print(f"generating {src} (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(src), "--train", str(n_train), "--test", str(n_test)],
                   check=True)
    return src


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_prepare"), help="cache and scratch folder")
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--test", type=int, default=50000)
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: prepare's own default)")
    p.add_argument("--skip-seed", action="store_true", help="measure prepare alone (e.g. for --test 300000 memory)")
    p.add_argument("--measure", choices=["seed", "prepare"], help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.src, args.out, args.workers)
        return 0
    if not args.workers:  # imported here, not at the top: the seed side's memory is measured without data_prep
        from data_prep.pipeline import default_workers

        args.workers = default_workers()
    if not GENERATOR.is_file():
        print(f"skipped: {GENERATOR} is absent (the benchmark data comes from ../shared/data)")
        return 0

    src = dataset(args.work, args.train, args.test)
    images = args.train + args.test
    print(f"{images:,} images ({args.train:,} train + {args.test:,} test), {args.workers} workers, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    results = {}
    for side in ([] if args.skip_seed else ["seed"]) + ["prepare"]:
        out = args.work / f"out-{side}"
        results[side] = run_side(side, src, out, args.workers)
        peak = max(results[side]["peak_rss"].values())
        print(f"  {side:<8} {results[side]['seconds']:7.1f} s  {images / results[side]['seconds']:9,.0f} images/s  "
              f"CPU {results[side]['cpu_seconds']:6.1f} s  "
              f"peak RSS {peak / 2**20:7.0f} MiB (self {results[side]['peak_rss']['self'] / 2**20:.0f}, "
              f"largest child {results[side]['peak_rss']['children'] / 2**20:.0f})")
        if side == "seed":
            shutil.rmtree(out, ignore_errors=True)
    if "seed" in results:
        print(f"  ratio    prepare is {results['seed']['seconds'] / results['prepare']['seconds']:.1f}x the seed's images/s "
              f"(wall); the seed uses {results['seed']['cpu_seconds'] / results['prepare']['cpu_seconds']:.1f}x "
              "prepare's CPU time")
    started = time.perf_counter()
    rerun = subprocess.run([sys.executable, "-m", "data_prep", "--data", str(src), "--out", str(args.work / "out-prepare")],
                           capture_output=True, text=True, cwd=ROOT)
    print(f"  rerun    {time.perf_counter() - started:7.2f} s  (whole process): {rerun.stderr.strip()}")
    shutil.rmtree(args.work / "out-prepare", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
