"""`cifar10-hvd demo-data`: a procedural dataset laid out exactly like the Kaggle CIFAR-10 download.

The project ships no images; this is how the demo and the tests get data on a clean
clone. Each class is a shape family (cross, wheeled box, triangle, ring, vertical
stripes, disc, dots, diagonal stripes, hull, block) in its own colour family, drawn
at a random position and scale over a noisy random background, so a small ResNet
learns it well above chance in a minute but not trivially.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from contracts.errors import InputError, run_command
from contracts.labels import CIFAR10_CLASSES, write_table
from contracts.schema import Parser

CLASSES = tuple(CIFAR10_CLASSES)
SIZE = 32
# class -> base hue in degrees; the foreground colour is jittered around it
_HUES = (210, 0, 50, 30, 90, 280, 120, 330, 190, 160)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in degrees, s and v in [0, 1]) as float RGB in [0, 255]."""
    h = (h % 360) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m]) * 255.0


def _mask(label: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean 32x32 mask of the class's shape at a random centre, scale and phase."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = rng.uniform(10, 22, size=2)
    r = rng.uniform(6, 11)
    dx, dy = xx - cx, yy - cy
    if label == 0:  # airplane: long wing bar crossed by a fuselage
        return ((np.abs(dy) < r * 0.22) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.2) & (np.abs(dy) < r * 0.7))
    if label == 1:  # automobile: wide box with two wheels
        body = (np.abs(dx) < r) & (dy > -r * 0.5) & (dy < r * 0.2)
        wheels = ((dx + r * 0.55) ** 2 + (dy - r * 0.35) ** 2 < (r * 0.3) ** 2) | \
                 ((dx - r * 0.55) ** 2 + (dy - r * 0.35) ** 2 < (r * 0.3) ** 2)
        return body | wheels
    if label == 2:  # bird: triangle pointing sideways
        return (dx > -r) & (dx < r) & (np.abs(dy) < (r - dx) * 0.45)
    if label == 3:  # cat: ring
        d = np.sqrt(dx ** 2 + dy ** 2)
        return (d < r) & (d > r * 0.55)
    if label == 4:  # deer: vertical stripes in a box
        period = rng.uniform(3.5, 6)
        return (np.abs(dx) < r) & (np.abs(dy) < r) & (np.sin(2 * np.pi * xx / period + rng.uniform(0, 6)) > 0.2)
    if label == 5:  # dog: filled disc
        return dx ** 2 + dy ** 2 < r ** 2
    if label == 6:  # frog: grid of dots
        period = rng.uniform(5, 7.5)
        ph = rng.uniform(0, period, size=2)
        return ((((xx + ph[0]) % period) - period / 2) ** 2 + (((yy + ph[1]) % period) - period / 2) ** 2) < (period * 0.3) ** 2
    if label == 7:  # horse: diagonal stripes in a box
        period = rng.uniform(4, 7)
        return (np.abs(dx) < r) & (np.abs(dy) < r) & (np.sin(2 * np.pi * (xx + yy) / period / 1.41) > 0.1)
    if label == 8:  # ship: hull (lower half ellipse) under a mast
        hull = (dy > 0) & ((dx / r) ** 2 + (dy / (r * 0.5)) ** 2 < 1)
        mast = (np.abs(dx) < 1.2) & (dy < 0) & (dy > -r * 0.9)
        return hull | mast
    # truck: big block with a small cab block
    return ((dx > -r) & (dx < r * 0.4) & (np.abs(dy) < r * 0.6)) | \
           ((dx >= r * 0.4) & (dx < r) & (dy > -r * 0.1) & (dy < r * 0.6))


def draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 uint8 image of class `label`."""
    bg = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.8))
    fg = _hsv_to_rgb(_HUES[label] + rng.normal(0, 25), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
    grad = np.linspace(-1, 1, SIZE, dtype=np.float32)[:, None, None] * rng.uniform(-30, 30)
    img = np.broadcast_to(bg, (SIZE, SIZE, 3)) + grad
    img = np.where(_mask(label, rng)[..., None], fg, img)
    img = img + rng.normal(0, 14, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_demo_dataset(out: str | Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> Path:
    """Write OUT laid out like the Kaggle download; published with one rename so OUT is never half-written."""
    out = Path(out)
    if n_train < len(CLASSES) or n_test < 0:
        raise ValueError(f"--train must be at least {len(CLASSES)} (one image per class) and --test at least 0")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rng = np.random.default_rng(seed)
        labels = np.arange(n_train) % len(CLASSES)
        rng.shuffle(labels)
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        for i, label in enumerate(labels, start=1):
            Image.fromarray(draw(int(label), rng)).save(tmp / "train" / f"{i}.png")
        names = np.array(CLASSES, dtype=object)
        write_table(tmp / "trainLabels.csv", np.arange(1, n_train + 1), names[labels])
        test_labels = rng.integers(0, len(CLASSES), size=n_test)
        for i, label in enumerate(test_labels, start=1):
            Image.fromarray(draw(int(label), rng)).save(tmp / "test" / f"{i}.png")
        test_ids = np.arange(1, n_test + 1)
        write_table(tmp / "sampleSubmission.csv", test_ids, ["cat"] * n_test)
        # The answers for the demo test set, outside the Kaggle layout's files, so `score` can be tried.
        write_table(tmp / "testSolution.csv", test_ids, names[test_labels])
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: cifar10-hvd demo-data --out DIR [--train N] [--test M] [--seed S]."""
    p = Parser(prog="cifar10-hvd demo-data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to create (must not exist)")
    p.add_argument("--train", type=int, default=5000, help="labelled training images (default 5000)")
    p.add_argument("--test", type=int, default=1000, help="unlabelled test images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")

    def body() -> int:
        args = p.parse_args(argv)
        try:
            out = write_demo_dataset(args.out, args.train, args.test, args.seed)
        except (ValueError, FileExistsError) as e:
            raise InputError(str(e)) from None
        print(f"demo data: {args.train} train + {args.test} test images in {out}")
        return 0

    return run_command("demo-data", body)
