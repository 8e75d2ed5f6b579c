"""Benchmark: `prepare` from each input form a user may have, side by side, at the competition's full size.

    .venv/bin/python benchmarks/bench_prepare.py                       # 50,000 train + 300,000 test
    .venv/bin/python benchmarks/bench_prepare.py --test 50000 --with-seed  # also the seed's reorganisation

Inputs: the extracted folders, train.7z + test.7z (packed as Kaggle ships them: `7z a -t7z -mx=5 -ms=on`,
solid LZMA), and the competition zip holding those two archives and trainLabels.csv. The floor of the
archive inputs is LZMA itself, which cannot be split across cores in a solid archive: `7z t` of both
archives (decompress, write nothing), timed in the same run. The goal: 7z input within 1.5x of that floor,
peak RSS under 500 MB.

The dataset is generated once with ../shared/data/make_kaggle_cifar10.py and packed once with p7zip
(`apt-get install -y p7zip-full`; installed here when missing and running as root), cached under --work.
Each side runs in its own process, so its peak resident memory (ru_maxrss of itself and of its largest
child, a decode worker) and CPU time (user + system, all processes) are its own. On a shared machine
the wall-clock ratio moves with the load (printed); CPU time moves much less. Images/s counts source
images (train + test) per second. The prepared arrays must be identical whichever the input (checked).
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
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT.parent / "shared" / "data" / "make_kaggle_cifar10.py"
INPUTS = ("folders", "7z", "zip")


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
    """Run one side in this process and print its wall time, CPU time, peak memory and array hashes as JSON."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    hashes = {}
    if side == "seed":
        seed_way(src, out, 0.1)
    else:
        import data_prep

        manifest = data_prep.prepare(src, out, data_prep.PrepareConfig(workers=workers))
        hashes = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    seconds = time.perf_counter() - started
    usage = {"self": resource.getrusage(resource.RUSAGE_SELF), "children": resource.getrusage(resource.RUSAGE_CHILDREN)}
    rss = {who: u.ru_maxrss * 1024 for who, u in usage.items()}
    cpu = {who: u.ru_utime + u.ru_stime for who, u in usage.items()}
    print(json.dumps({"seconds": seconds, "cpu_seconds": sum(cpu.values()), "main_cpu_seconds": cpu["self"],
                      "peak_rss": rss, "hashes": hashes}))


def run_side(side: str, src: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", side, "--src", str(src), "--out", str(out),
                           "--workers", str(workers)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dataset(generator: Path, work: Path, n_train: int, n_test: int) -> Path:
    """The cached Kaggle-layout dataset, generated on first use."""
    src = work / f"kaggle-{n_train}-{n_test}"
    if (src / "sampleSubmission.csv").is_file():
        return src
    shutil.rmtree(src, ignore_errors=True)
    print(f"generating {src} (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(generator), "--out", str(src), "--train", str(n_train), "--test", str(n_test)],
                   check=True)
    return src


def seven_zip() -> str:
    """p7zip's 7z, installed with apt-get when missing and running as root."""
    if shutil.which("7z") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing p7zip-full (apt-get) ...", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "p7zip-full"], check=False, capture_output=True)
        if shutil.which("7z") is None:
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "p7zip-full"], check=False, capture_output=True)
    if shutil.which("7z") is None:
        sys.exit("the archive inputs need p7zip: apt-get install -y p7zip-full")
    return "7z"


def packed(src: Path) -> tuple[Path, Path]:
    """SRC as Kaggle ships it, cached beside it: a folder of train.7z, test.7z, trainLabels.csv, and that zip."""
    folder, zipped = src.with_name(src.name + "-7z"), src.with_name(src.name + ".zip")
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            print(f"packing {folder / split}.7z (once; minutes for test) ...", file=sys.stderr, flush=True)
            subprocess.run([seven_zip(), "a", "-t7z", "-mx=5", "-ms=on", str(folder / f"{split}.7z"), split],
                           cwd=src, check=True, capture_output=True)
        for name in ("trainLabels.csv", "sampleSubmission.csv"):
            shutil.copy(src / name, folder / name)
        (folder / "done").touch()
    if not zipped.is_file():
        tmp = zipped.with_name(zipped.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name in ("trainLabels.csv", "sampleSubmission.csv", "train.7z", "test.7z"):
                zf.write(folder / name, name)
        tmp.rename(zipped)
    return folder, zipped


def lzma_floor(folder: Path) -> tuple[float, float]:
    """Seconds (wall, CPU) for `7z t` of both archives: decompress everything, write nothing."""
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    for split in ("train", "test"):
        subprocess.run([seven_zip(), "t", str(folder / f"{split}.7z")], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.perf_counter() - started, cpu


def row(name: str, result: dict, images: int) -> str:
    peak = max(result["peak_rss"].values())
    return (f"| {name:<8} | {result['seconds']:7.1f} s | {images / result['seconds']:9,.0f} | {result['cpu_seconds']:6.1f} s "
            f"(main {result['main_cpu_seconds']:.1f}) | "
            f"{peak / 2**20:6.0f} MiB (self {result['peak_rss']['self'] / 2**20:.0f}, "
            f"largest child {result['peak_rss']['children'] / 2**20:.0f}) |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_prepare"), help="cache and scratch folder")
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--test", type=int, default=300000)
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: prepare's own default)")
    p.add_argument("--inputs", default=",".join(INPUTS), help="comma-separated subset of folders,7z,zip")
    p.add_argument("--with-seed", action="store_true", help="also time the seed's reorganisation (copies every file)")
    p.add_argument("--skip-seed", action="store_true", help="(the default now; kept for old command lines)")
    p.add_argument("--generator", type=Path, default=GENERATOR, help="make_kaggle_cifar10.py (default: ../shared/data/)")
    p.add_argument("--measure", choices=["seed", *INPUTS], help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.src, args.out, args.workers)
        return 0
    if not args.workers:  # imported here, not at the top: the seed side's memory is measured without data_prep
        from data_prep.preparation import default_workers

        args.workers = default_workers()
    if not args.generator.is_file():
        print(f"skipped: {args.generator} is absent (the benchmark data comes from ../shared/data)")
        return 0
    inputs = [name for name in args.inputs.split(",") if name]
    if unknown := set(inputs) - set(INPUTS):
        sys.exit(f"--inputs: unknown {sorted(unknown)}; choose from {','.join(INPUTS)}")
    src = dataset(args.generator, args.work, args.train, args.test)
    sources = {"folders": src, "seed": src}
    if {"7z", "zip"} & set(inputs):
        sources["7z"], sources["zip"] = packed(src)
    images = args.train + args.test
    print(f"{images:,} images ({args.train:,} train + {args.test:,} test), {args.workers} workers, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print("| input    | wall      | images/s  | CPU (main process) | peak RSS |\n|---|---|---|---|---|")
    results = {}
    for side in (["seed"] if args.with_seed and not args.skip_seed else []) + inputs:
        results[side] = run_side(side, sources[side], args.work / f"out-{side}", args.workers)
        print(row(side, results[side], images), flush=True)
        if side != "folders":
            shutil.rmtree(args.work / f"out-{side}", ignore_errors=True)
    summary(args, results, sources, images)
    return 0


def summary(args: argparse.Namespace, results: dict, sources: dict, images: int) -> None:
    """The LZMA floor and the 7z ratio against it, identical arrays, the rerun, and the load at the end."""
    if "7z" in results:
        floor, floor_cpu = lzma_floor(sources["7z"])
        ratio = results["7z"]["seconds"] / floor
        print(f"LZMA floor (`7z t` of train.7z and test.7z, one after the other): {floor:.1f} s ({floor_cpu:.1f} s CPU); "
              f"7z input is {ratio:.2f}x the floor in wall time (goal: <= 1.5x); its LZMA core (the main process) used "
              f"{results['7z']['main_cpu_seconds'] / floor_cpu:.2f}x the floor's CPU time; peak RSS "
              f"{max(results['7z']['peak_rss'].values()) / 2**20:.0f} MiB (goal: < 500 MB)")
    hashes = [r["hashes"] for r in results.values() if r["hashes"]]
    print(f"prepared arrays identical across {len(hashes)} inputs: {all(h == hashes[0] for h in hashes)}")
    if "seed" in results and "folders" in results:
        print(f"seed vs folders: prepare is {results['seed']['seconds'] / results['folders']['seconds']:.1f}x the seed's "
              f"images/s (wall); the seed uses {results['seed']['cpu_seconds'] / results['folders']['cpu_seconds']:.1f}x "
              "prepare's CPU time")
    if "folders" in results:
        started = time.perf_counter()
        rerun = subprocess.run([sys.executable, "-m", "data_prep", "--data", str(sources["folders"]),
                                "--out", str(args.work / "out-folders")], capture_output=True, text=True, cwd=ROOT)
        print(f"rerun (folders, up to date) {time.perf_counter() - started:.2f} s (whole process): {rerun.stderr.strip()}")
        shutil.rmtree(args.work / "out-folders", ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    sys.exit(main())
