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

ACTIVATION_BUDGET = 64 << 20  # bytes per activation tensor on CPU; bounds a rank's memory on wide models
GPU_BUDGET_FRACTION = 16  # on GPU: device memory / 16 per activation tensor (16 GB -> 1 GiB, 4096 rows at width 64)
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


def device_budget(device_type: str, device_bytes: int = 0) -> int:
    """Bytes one activation tensor may take: ACTIVATION_BUDGET on CPU, a share of the memory of a GPU."""
    if device_type == "gpu" and device_bytes > 0:
        return max(ACTIVATION_BUDGET, device_bytes // GPU_BUDGET_FRACTION)
    return ACTIVATION_BUDGET


def context_budget(ctx) -> int:
    """device_budget() for an MXNet context (a GPU's total memory from mx.context.gpu_memory_info)."""
    if ctx.device_type != "gpu":
        return device_budget(ctx.device_type)
    import mxnet as mx

    return device_budget("gpu", mx.context.gpu_memory_info(ctx.device_id)[1])


def forward_rows(batch_size: int, width: int, budget: int = ACTIVATION_BUDGET) -> int:
    """Rows per forward pass: batch_size, capped so a stage-1 activation (width x 32 x 32 floats a row) stays within budget."""
    return max(1, min(batch_size, budget // (width * 32 * 32 * 4)))


def forward_batches(fn, images: np.ndarray, ctx, batch_size: int, crop: int = 0) -> Iterator[tuple[int, int, object]]:
    """(start, stop, fn(x)) for images (uint8 N x 32 x 32 x 3) seen through eval_transform(crop), x a
    batch on ctx whose rows beyond stop - start are stale. fn(x) is queued first, then batch k+1 is
    transformed and its device copy queued (trainer.prefetch), so both overlap batch k's forward.
    Pages of a memory-mapped input are released as the stream passes them."""
    from trainer.prefetch import CopyRing

    n = len(images)
    if n == 0:
        return
    bs = min(batch_size, n)
    buf = np.zeros((bs, 3) + images.shape[1:3], dtype=np.float32)
    ring = CopyRing(ctx, slots=2)
    release, released = page_releaser(images), 0

    def stage(start: int):
        eval_transform(images[start:start + bs], crop, out=buf[: min(bs, n - start)])
        return ring.put(buf)[0]

    x = stage(0)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        result = fn(x)
        if stop < n:
            x = stage(stop)
        yield start, stop, result
        if stop - released >= RELEASE_ROWS or stop == n:
            release(released, stop)
            released = stop


def combine_views(forward, x, tta: str, mirror, moved) -> tuple:
    """(plain logits, logits in the tta view) of batch x for any engine's arrays: forward(batch) gives logits,
    mirror(batch) the left-right mirror, moved(batch) the batch moved one pixel up-left and one down-right with
    reflected borders. flip: the plain and mirrored views' logits summed. flip-translate (airbench's view): half
    that pair and a quarter each of the moved pairs, scaled as flip's sum (twice the mean)."""
    plain = forward(x)
    if tta == "none":
        return plain, plain
    pair = plain + forward(mirror(x))
    if tta == "flip":
        return plain, pair
    return plain, pair + 0.5 * sum(forward(m) + forward(mirror(m)) for m in moved(x))


def view_logits(net, x, tta: str = "none") -> tuple:
    """(plain logits, logits in the tta view) of net for NCHW batch x (combine_views)."""
    def moved(batch) -> list:
        import mxnet as mx

        h, w = batch.shape[2:]
        padded = mx.nd.pad(batch, mode="reflect", pad_width=(0, 0, 0, 0, 1, 1, 1, 1))
        return [padded[:, :, 0:h, 0:w], padded[:, :, 2:h + 2, 2:w + 2]]

    return combine_views(net, x, tta, lambda batch: batch.flip(axis=3), moved)


def logit_batches(net, images: np.ndarray, ctx, batch_size: int, crop: int = 0,
                  tta: str = "none") -> Iterator[tuple[int, int, object]]:
    """(start, stop, logits of rows start..stop) for images seen through eval_transform(crop)
    (forward_batches), in the tta view (view_logits)."""
    for start, stop, (_, logits) in forward_batches(lambda x: view_logits(net, x, tta), images, ctx, batch_size, crop):
        yield start, stop, logits[: stop - start]
