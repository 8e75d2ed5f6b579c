"""Benchmark: valid accuracy of trained models under more test-time views, and what each view costs.

Whether more views than flip (the recipe's `tta: flip`) buy accuracy worth their predict time.
For each tune run dir given, its final model scores the prepared valid split with the views
- plain; flip (plain + mirror, the recipe's); 6 views (airbench's weighting: 1/2 for plain + mirror,
  1/4 each for the image shifted one pixel up-left and down-right, each with its mirror);
  10 views (plain + mirror and the four diagonal one-pixel shifts, each with its mirror, equal weights),
shifts padding by reflection as pad-and-crop training does. A view is one forward over every image,
so predict's cost grows with the views: the table gives the forward rate of one process here.

    .venv/bin/python benchmarks/bench_tta_views.py --prepared PREP RUN/tune [RUN/tune ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHIFTS = ((1, 1), (-1, -1), (1, -1), (-1, 1))


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 images (N x H x W x C) translated by (dy, dx) pixels, the edge filled by reflection."""
    p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return np.ascontiguousarray(p[:, 1 + dy:1 + dy + images.shape[1], 1 + dx:1 + dx + images.shape[2]])


def views(net, images: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """(plain logits, plain + mirror logits) of images, from one pass of validation's own loop
    (trainer.inference, as eval_counts runs it)."""
    import mxnet as mx

    from trainer.inference import forward_batches, view_logits

    plain, flip = [], []
    for start, stop, (p, f) in forward_batches(lambda x: view_logits(net, x, "flip"), images, mx.cpu(), 500, crop):
        plain.append(p[: stop - start].asnumpy())
        flip.append(f[: stop - start].asnumpy())
    return np.concatenate(plain), np.concatenate(flip)


def score(run: Path, prepared: Path) -> dict:
    """Valid accuracy of run's final model under each view set, and one view's forward rate (img/s)."""
    import mxnet as mx

    from data_prep.store import open_split
    from predictor.predict import load_model

    valid = open_split(prepared, "valid")
    net, _, _, crop = load_model(run, mx.cpu())
    images, y = np.asarray(valid.images), np.asarray(valid.labels)
    start = time.perf_counter()
    plain, flip = views(net, images, crop)
    rate = 2 * len(images) / (time.perf_counter() - start)  # two forwards an image
    shifts = {d: views(net, shifted(images, *d), crop)[1] for d in SHIFTS}

    def acc(z: np.ndarray) -> float:
        return float((z.argmax(axis=1) == y).mean())

    return {"run": str(run), "plain": acc(plain), "flip": acc(flip),
            "6 views": acc(0.5 * flip + 0.25 * (shifts[SHIFTS[0]] + shifts[SHIFTS[1]])),
            "10 views": acc(flip + sum(shifts.values())), "img/s per view": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="prepared dir with the valid split")
    parser.add_argument("runs", type=Path, nargs="+", help="tune run dirs (each with its final model)")
    args = parser.parse_args()
    print("| run | plain | flip | 6 views | 10 views | 10 views - flip | img/s per view |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = score(run, args.prepared)
        print(f"| {r['run']} | {r['plain']:.2%} | {r['flip']:.2%} | {r['6 views']:.2%} | {r['10 views']:.2%} | "
              f"{(r['10 views'] - r['flip']) * 100:+.2f} | {r['img/s per view']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
