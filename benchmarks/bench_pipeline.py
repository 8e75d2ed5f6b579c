"""Augmented-batch throughput on one core: the batched numpy pipeline vs d2l's per-image DataLoader.

Both produce d2l's training transform for one rank's shard (batch 128). d2l's
side is gluon's ArrayDataset + transform_first + DataLoader(num_workers=0) over in-memory
uint8 images (its best case: no PNG decoding). Pinned to one core, one thread.

    .venv/bin/python benchmarks/bench_pipeline.py [--prepared PREP] [--images 20000]
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.pipeline import batched_stream, d2l_stream  # noqa: E402
from trainer.presets import augment  # noqa: E402
from trainer.sharding import train_shard  # noqa: E402


def load_images(prepared: str | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n training images from a prepared dir (repeated if it is smaller), else random ones."""
    if prepared:
        import data_prep

        split = data_prep.open_split(prepared, "train")
        idx = np.arange(n) % len(split.images)
        return np.asarray(split.images[idx]), np.asarray(split.labels[idx])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def rate(stream, images_per_batch: int, min_seconds: float) -> tuple[float, float]:
    """Images per wall second and per CPU second consumed from stream (stops early after min_seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for _x, _y in stream:
        n += images_per_batch
        if time.perf_counter() - start > min_seconds:
            break
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    """Print img/s of each pipeline and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", help="prepared dir to read images from (default: random images)")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=2.0, help="time each measurement at most this long")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each pipeline (the best is shown)")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    images, labels = load_images(args.prepared, args.images)
    shard = train_shard(len(images), args.batch_size, rank=0, size=1, seed=0, epoch=0)
    bs = args.batch_size

    def direct_stream():
        rng = np.random.default_rng(0)
        return ((augment(images[np.sort(r)], rng), None) for r in shard)

    # the machine may be shared: alternate the pipelines for a few rounds and keep each one's best
    direct = streamed = seed = (0.0, 0.0)
    for _ in range(args.rounds):
        direct = max(direct, rate(direct_stream(), bs, args.seconds))
        streamed = max(streamed, rate(batched_stream(images, labels, shard, np.random.default_rng(0)), bs, args.seconds))
        seed = max(seed, rate(d2l_stream(images, labels, shard), bs, args.seconds))

    print(f"one core, batch {bs}, best of {args.rounds}, {len(images)} images ({'prepared ' + args.prepared if args.prepared else 'random'})")
    print(f"{'':38}{'img/s':>10} {'img/CPU-s':>10}")
    for name, (wall, cpu) in (("batched augment (calling thread)", direct),
                              ("batched stream (background thread)", streamed),
                              ("seed DataLoader (transform_first)", seed)):
        print(f"{name:38}{wall:10,.0f} {cpu:10,.0f}")
    print(f"{'ratio batched stream / seed':38}{streamed[0] / seed[0]:9.1f}x {streamed[1] / seed[1]:9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
