"""Training batch streams for one rank's shard: the batched numpy pipeline, or d2l's DataLoader.

Both yield (x, y) per step: x float32 (B, 3, 32, 32) (numpy for "batched", NDArray for
"d2l"), y float32 labels. The batched stream runs in a background thread a few batches
ahead (numpy and MXNet release the GIL), so augmentation overlaps the training step.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from trainer.presets import d2l_transform, train_transform


def prefetch(batches: Iterable, depth: int = 3) -> Iterator:
    """Run the batches iterable in a background thread, up to `depth` items ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    threading.Thread(target=work, name="augment", daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def batched_stream(images: np.ndarray, labels: np.ndarray, shard: np.ndarray, rng: np.random.Generator,
                   depth: int = 3, transform=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Augmented batches for the (steps, batch) index array `shard`, prepared in a background thread.

    transform(images, rng, out, rows) is the training transform (presets.train_transform(), d2l's, by
    default); rows are the batch's indices into images.

    The x arrays come from a ring of depth + 3 buffers (see augment._scratch for why): a batch
    stays valid until the consumer has asked for the next one; copy it before then.
    """
    transform = transform or train_transform()
    ring = [np.empty((shard.shape[1], 3, 32, 32), dtype=np.float32) for _ in range(depth + 3)]

    def produce() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step, rows in enumerate(shard):
            order = np.sort(rows)  # sorted reads are kinder to a memmap; the batch's order is irrelevant
            yield (transform(images[order], rng, out=ring[step % len(ring)], rows=order),
                   labels[order].astype(np.float32))

    return prefetch(produce(), depth)


def d2l_stream(images: np.ndarray, labels: np.ndarray, shard: np.ndarray) -> Iterator:
    """d2l's pipeline over this shard: ArrayDataset + transform_first + DataLoader (no shuffling:
    the shard is already the epoch's permutation; every batch is full, as with last_batch='discard')."""
    import mxnet as mx
    from mxnet import gluon

    rows = shard.reshape(-1)
    dataset = gluon.data.ArrayDataset(mx.nd.array(images[rows], dtype="uint8"),
                                      labels[rows].astype(np.float32))
    loader = gluon.data.DataLoader(dataset.transform_first(d2l_transform()), batch_size=shard.shape[1],
                                   shuffle=False, last_batch="discard", num_workers=0)
    return iter(loader)
