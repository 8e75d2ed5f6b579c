"""The train and eval transforms in one place (torchvision's presets): what the model sees in each phase.

- normalize: d2l's ToTensor + Normalize, batched on uint8 NHWC arrays.
- augment: d2l's training augmentation, batched in numpy: Resize(40), RandomResizedCrop(32), flip, normalize.
- padcrop, cutout, train_transform: the short-schedule alternatives: translation by padding and
  cropping plus flip, and cutout, chosen by TrainConfig's augment/pad/pad_mode/cutout keys.
- eval_transform: the evaluation view (normalize only, or a centre crop at the training zoom).
- d2l_transform: the d2l chapter's own per-image gluon train transform (the "d2l" pipeline).

The d2l chapter runs, per image, gluon's Resize(40) (OpenCV bilinear), RandomResizedCrop(32,
scale=(0.64, 1), ratio=(1, 1)), RandomFlipLeftRight, ToTensor and Normalize. With ratio 1
the crop is a square of integer side s = round(40 * sqrt(U(0.64, 1))) in [32, 40] at integer
offsets drawn independently per axis, so per axis there are only 45 (side, offset) pairs.
Upscaling and crop-resize are both linear along each axis, so each pair is one 32x32 matrix
(crop-resize @ upscale); a flip reverses the rows of the column matrix. A batch is then
out[n] = A_rows[n] @ x[n] @ A_cols[n].T per channel: two batched float32 matmuls.
Normalization commutes with the resampling (every matrix row sums to 1), so it runs last,
on contiguous float32.

Unlike d2l, the 40x40 intermediate is not rounded to uint8 (a difference of < 1/255).
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)
# ToTensor divides by 255, then Normalize: (x/255 - mean)/std == x*scale + shift.
NORM_SCALE = (1.0 / (255.0 * STD)).astype(np.float32)
NORM_SHIFT = (-MEAN / STD).astype(np.float32)
SIZE = 32
RESIZE = 40
SCALE = (0.64, 1.0)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) OpenCV INTER_LINEAR weights (half-pixel centres, edge clamping)."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        fx = (i + 0.5) * scale - 0.5
        sx = math.floor(fx)
        fx -= sx
        if sx < 0:
            sx, fx = 0, 0.0
        if sx >= in_size - 1:
            sx, fx = in_size - 1, 0.0
        m[i, sx] += 1.0 - fx
        if fx:
            m[i, sx + 1] += fx
    return m


def _crop_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite matrices for every (side, offset), their transposes flipped, and a side/offset index."""
    upscale = bilinear_matrix(RESIZE, SIZE)
    index = np.full((RESIZE + 1, RESIZE + 1), -1, dtype=np.int64)
    mats = []
    for side in range(SIZE, RESIZE + 1):
        shrink = bilinear_matrix(SIZE, side)
        for off in range(RESIZE - side + 1):
            crop = np.zeros((SIZE, RESIZE))
            crop[:, off:off + side] = shrink
            index[side, off] = len(mats)
            mats.append(crop @ upscale)
    rows = np.stack(mats).astype(np.float32)
    cols_t = np.ascontiguousarray(rows.transpose(0, 2, 1))
    # entries [k] are unflipped, [k + len] flipped: reversing output columns mirrors the image
    cols_t = np.concatenate([cols_t, np.ascontiguousarray(cols_t[:, :, ::-1])])
    return rows, cols_t, index


ROWS, COLS_T, INDEX = _crop_tables()
_SCALE_NCHW = NORM_SCALE[None, :, None, None]
_SHIFT_NCHW = NORM_SHIFT[None, :, None, None]


def draw_params(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the row matrix index and the (possibly flipped) column matrix index, distributed as d2l's."""
    side = np.rint(RESIZE * np.sqrt(rng.uniform(SCALE[0], SCALE[1], n))).astype(np.int64)
    # randint(0, 40 - side) inclusive, independently for x and y, as in mxnet.image.random_size_crop
    x0 = (rng.random(n) * (RESIZE - side + 1)).astype(np.int64)
    y0 = (rng.random(n) * (RESIZE - side + 1)).astype(np.int64)
    flip = rng.random(n) < 0.5
    return INDEX[side, y0], INDEX[side, x0] + flip * len(ROWS)


def augment(images: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> float32 (N, 3, 32, 32): d2l's random train transform, batched."""
    rows_k, cols_k = draw_params(rng, len(images))
    return apply_params(images, rows_k, cols_k, out)


def apply_params(images: np.ndarray, rows_k: np.ndarray, cols_k: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
    """The deterministic part of augment, for given row/column matrix indices (from draw_params)."""
    n = len(images)
    x, tmp = _scratch(n)
    x[...] = images.transpose(0, 3, 1, 2)
    np.matmul(ROWS[rows_k][:, None], x, out=tmp)
    if out is None:
        out = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    np.matmul(tmp.reshape(n, 3 * SIZE, SIZE), COLS_T[cols_k], out=out.reshape(n, 3 * SIZE, SIZE))
    # normalize last: it commutes with the resampling, and is cheaper on contiguous float32
    out *= _SCALE_NCHW
    out += _SHIFT_NCHW
    return out


def draw_shifts(rng: np.random.Generator, n: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: row and column offsets into the padded image (uniform in 0..2*pad), and a flip (p = 1/2)."""
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    return dy, dx, rng.random(n) < 0.5


def apply_shifts(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int,
                 mode: str = "reflect", out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> normalized float32 (N, 3, 32, 32): each image padded by `pad` (reflect or zero),
    its 32x32 window at (dy, dx) taken, mirrored where flip. One gather for the whole batch."""
    n = len(images)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect" if mode == "reflect" else "constant")
    ar = np.arange(SIZE)
    rows = dy[:, None] + ar
    cols = np.where(flip[:, None], dx[:, None] + SIZE - 1 - ar, dx[:, None] + ar)
    crops = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return normalize(crops, out=out)


def padcrop(images: np.ndarray, rng: np.random.Generator, pad: int = 4, mode: str = "reflect",
            out: np.ndarray | None = None, flip: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> float32 (N, 3, 32, 32): random translation by up to pad pixels, flip, normalize.
    flip, if given, decides each image's mirroring instead of the random draw (which is still made, so the
    translations are the same either way)."""
    dy, dx, drawn = draw_shifts(rng, len(images), pad)
    return apply_shifts(images, dy, dx, drawn if flip is None else flip, pad, mode, out)


def alternating_flips(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which of n training images are mirrored in this epoch: a random half (fixed by seed) in even epochs,
    the other half in odd ones, so every image is seen both ways in any two consecutive epochs (airbench's
    derandomised flip: random flips show some images the same way several epochs running)."""
    first = np.random.default_rng([seed, 2]).random(n) < 0.5
    return first ^ bool(epoch % 2)


def draw_cutout(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the top-left corner of a size x size square lying wholly inside the 32x32 image."""
    return rng.integers(0, SIZE - size + 1, n), rng.integers(0, SIZE - size + 1, n)


def apply_cutout(x: np.ndarray, y0: np.ndarray, x0: np.ndarray, size: int) -> np.ndarray:
    """Zero (the mean pixel, after normalization) the square at (y0, x0) of each NCHW image, in place."""
    ar = np.arange(SIZE)
    in_rows = (ar >= y0[:, None]) & (ar < y0[:, None] + size)
    in_cols = (ar >= x0[:, None]) & (ar < x0[:, None] + size)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    x *= keep[:, None].astype(np.float32)
    return x


@functools.lru_cache(maxsize=8)
def area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of an area (box) downscale: output pixel i averages the input
    interval [i, i+1) * in_size/out_size, partial pixels weighted by their overlap. Cached: every training
    batch of a low-resolution epoch uses the same matrix (read-only, do not modify it)."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(math.floor(lo), min(math.ceil(hi), in_size)):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return (m / scale).astype(np.float32)


def downscale(x: np.ndarray, size: int) -> np.ndarray:
    """float32 (N, C, H, W) batch -> (N, C, size, size) by area averaging (a new array; x itself if same size)."""
    if size == x.shape[2] == x.shape[3]:
        return x
    rows, cols = area_matrix(size, x.shape[2]), area_matrix(size, x.shape[3])
    return np.matmul(np.matmul(rows, x), cols.T)


def train_transform(augment_name: str = "d2l", pad: int = 4, pad_mode: str = "reflect", cutout: int = 0,
                    size: int = SIZE, flips: np.ndarray | None = None):
    """transform(images, rng, out, rows) for training: d2l's augment (the default), or padcrop; then cutout if
    on; then, for size < 32 (progressive resizing), the batch downscaled to size x size (a new array, not out).
    flips (padcrop only): per training image, whether it is mirrored (alternating_flips); rows are the
    images' indices into the training split."""
    if flips is not None and augment_name != "padcrop":
        raise ValueError("flips apply to padcrop only")

    def transform(images: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> np.ndarray:
        if augment_name == "padcrop":
            x = padcrop(images, rng, pad, pad_mode, out, None if flips is None else flips[rows])
        else:
            x = augment(images, rng, out)
        if cutout:
            apply_cutout(x, *draw_cutout(rng, len(x), cutout), cutout)
        return downscale(x, size)

    return transform


def normalize(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalized with d2l's mean and std."""
    n, h, w, c = images.shape
    if out is None:
        out = np.empty((n, c, h, w), dtype=np.float32)
    for ch in range(c):
        np.multiply(images[..., ch], NORM_SCALE[ch], out=out[:, ch], casting="unsafe")
        out[:, ch] += NORM_SHIFT[ch]
    return out


def eval_transform(images: np.ndarray, crop: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> float32 (N, 3, 32, 32) for evaluation and predict.

    crop 0 is d2l's transform (normalize only). Training crops show objects zoomed by
    40/side (1.00 to 1.25), so d2l evaluates at a smaller scale than it trains; crop S
    takes the centre SxS of the same 40x40 upscale instead, seen at the training zoom.
    """
    if not crop:
        return normalize(images, out=out)
    k = INDEX[crop, (RESIZE - crop) // 2]
    ks = np.full(len(images), k, dtype=np.int64)
    return apply_params(images, ks, ks, out)


def d2l_transform():
    """d2l's per-image gluon train transform (kaggle_cifar10.md's transform_train)."""
    from mxnet.gluon.data.vision import transforms

    return transforms.Compose([
        transforms.Resize(40),
        transforms.RandomResizedCrop(32, scale=(0.64, 1.0), ratio=(1.0, 1.0)),
        transforms.RandomFlipLeftRight(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN.tolist(), STD.tolist()),
    ])


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 (n, 3, 32, 32) work arrays, reused per thread.

    Fresh multi-megabyte arrays per batch cost more than the arithmetic: glibc hands the
    pages back to the OS on free and every new batch page-faults them in again.
    """
    bufs = getattr(_local, "bufs", None)
    if bufs is None or len(bufs[0]) != n:
        bufs = _local.bufs = tuple(np.empty((n, 3, SIZE, SIZE), dtype=np.float32) for _ in range(2))
    return bufs
