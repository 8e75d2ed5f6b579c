"""Fixed-shape batched forward passes over uint8 images: the one inference loop of validation and predict.

Every forward has the same shape (the last batch is padded), so the graph is bound once
and a row's result does not depend on how the rows were split into batches or across ranks
(BatchNorm uses its running statistics at inference).
"""
from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

from trainer.presets import eval_transform

ACTIVATION_BUDGET = 64 << 20  # bytes per activation tensor; bounds a rank's memory on wide models
RELEASE_ROWS = 4096  # ~12 MB of images between releases of the memory map's pages


def page_releaser(images: np.ndarray):
    """release(lo, hi): drop rows [lo, hi) of a memory-mapped array from this process's resident set.

    A rank streams through its whole shard once; without this, every page it touched would stay
    mapped and count toward its RSS (921 MB for 300,000 images). The file stays in the page
    cache, so nothing is re-read from disk. A no-op for arrays that are not memory maps.
    """
    mm = getattr(images, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or len(images) == 0 or not images.flags.c_contiguous:
        return lambda lo, hi: None
    first = images.ctypes.data - np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
    row, page = images.strides[0], mmap.PAGESIZE

    def release(lo: int, hi: int) -> None:
        a = (first + lo * row) // page * page
        b = (first + hi * row) // page * page
        if b > a:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    return release


def forward_rows(batch_size: int, width: int) -> int:
    """Rows per forward pass: batch_size, capped so a stage-1 activation (width x 32 x 32 floats a row) stays within budget."""
    return max(1, min(batch_size, ACTIVATION_BUDGET // (width * 32 * 32 * 4)))


def logit_batches(net, images: np.ndarray, ctx, batch_size: int, crop: int = 0,
                  tta: str = "none") -> Iterator[tuple[int, int, object]]:
    """(start, stop, logits of rows start..stop) for images (uint8 N x 32 x 32 x 3) seen through
    eval_transform(crop); tta='flip' adds the mirrored view's logits. Pages of a memory-mapped
    input are released as the stream passes them."""
    import mxnet as mx

    n = len(images)
    if n == 0:
        return
    bs = min(batch_size, n)
    buf = np.zeros((bs, 3) + images.shape[1:3], dtype=np.float32)
    release, released = page_releaser(images), 0
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        eval_transform(images[start:stop], crop, out=buf[: stop - start])
        x = mx.nd.array(buf, ctx=ctx)
        logits = net(x)
        if tta == "flip":
            logits = logits + net(x.flip(axis=3))
        yield start, stop, logits[: stop - start]
        if stop - released >= RELEASE_ROWS or stop == n:
            release(released, stop)
            released = stop
