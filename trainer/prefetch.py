"""Host-to-device prefetch: batch k+1's copy to the device is queued before batch k's step runs.

`mx.nd.array(x, ctx=gpu)` copies from pageable memory and blocks Python until the copy is
done, so the GPU idles while the host copies. Here a batch is first copied on the host into
one of a ring of page-locked slots (`mx.cpu_pinned()`), then MXNet's engine copies the slot to
the device (CopyCPU2GPU on the GPU's copy stream, asynchronous from pinned memory) while the
caller goes on. Lifetime rule: a slot is rewritten only after its previous copy has landed
(its destination has been written), so no copy ever reads a half-overwritten slot.

On CPU the same ring runs with its slots in ordinary cpu memory handed out as the batch itself:
one host memcpy per array, like mx.nd.array, and no second copy. There the slot's readers are
the step's operators, and rewriting a slot waits for them (MXNet orders a write after pending
reads), so a returned batch stays valid for the next `slots - 1` puts. pinned=True forces the
GPU's two-stage path on any context (the tests run it on CPU).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

DEFAULT_SLOTS = 4  # one-ahead copies plus the trainer's two steps in flight, and one spare


class CopyRing:
    """`slots` pinned host buffers per array position, reused in turn; put() returns device arrays."""

    def __init__(self, ctx, slots: int = DEFAULT_SLOTS, pinned: bool | None = None):
        if slots < 2:
            raise ValueError(f"a copy ring needs at least 2 slots to overlap copies, got {slots}")
        self.ctx = ctx
        self.pinned = ctx.device_type != "cpu" if pinned is None else pinned
        self.host: list[tuple | None] = [None] * slots  # per slot: one pinned NDArray per array position
        self.copies: list[tuple] = [()] * slots  # per slot: the device arrays its last copy writes
        self.count = 0  # batches put so far; the next one goes to slot count % slots

    def slot_arrays(self, i: int, arrays: tuple[np.ndarray, ...]) -> tuple:
        """Slot i's buffers (pinned, or on ctx itself), (re)allocated when the shapes or dtypes change."""
        import mxnet as mx

        host = self.host[i]
        if host is None or [(h.shape, h.dtype) for h in host] != [(a.shape, a.dtype) for a in arrays]:
            where = mx.cpu_pinned(0) if self.pinned else self.ctx
            host = self.host[i] = tuple(mx.nd.empty(a.shape, ctx=where, dtype=a.dtype) for a in arrays)
        return host

    def put(self, *arrays: np.ndarray) -> tuple:
        """Copy arrays into the next slot and queue their copies to the device; returns the device arrays.

        The numpy inputs may be reused as soon as this returns (they are copied here).
        """
        i = self.count % len(self.host)
        self.count += 1
        for pending in self.copies[i]:
            pending.wait_to_read()  # the lifetime rule: the slot's previous copy has landed
        host = self.slot_arrays(i, arrays)
        out = []
        for h, a in zip(host, arrays, strict=True):
            h[:] = a  # a host memcpy (MXNDArraySyncCopyFromCPU) after the slot's pending reads; no device wait
            out.append(h.copyto(self.ctx) if self.pinned else h)  # the device copy is queued; returns at once
        self.copies[i] = tuple(out) if self.pinned else ()
        return tuple(out)


def prefetched(batches: Iterable[tuple], ring: CopyRing) -> Iterator[tuple]:
    """Device copies of each (x, y) batch, one batch ahead: batch k+1's copy is queued before batch k is yielded.

    numpy batches go through the ring; NDArray batches (d2l's DataLoader) are moved with
    as_in_context. A numpy batch is copied before the next one is asked for, which is all the
    ring buffers of trainer.pipeline.batched_stream require.
    """
    import mxnet as mx

    ahead = None
    for batch in batches:
        if isinstance(batch[0], mx.nd.NDArray):
            nxt = tuple(a.as_in_context(ring.ctx) for a in batch)
        else:
            nxt = ring.put(*batch)
        if ahead is not None:
            yield ahead
        ahead = nxt
    if ahead is not None:
        yield ahead
