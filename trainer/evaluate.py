"""Exact accuracy and loss on an eval split: each rank scores a contiguous slice, counts are summed.

The per-image result does not depend on the batch it is in (trainer.inference), so the
allreduced counts equal a one-process evaluation.
"""
from __future__ import annotations

import numpy as np

from trainer.inference import logit_batches
from trainer.sharding import eval_slice


def eval_counts(net, images: np.ndarray, labels: np.ndarray, ctx, batch_size: int, crop: int = 0) -> np.ndarray:
    """[correct, total, loss_sum] (float64) of net over images/labels, seen through eval_transform(crop)."""
    import mxnet as mx
    from mxnet import gluon

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    correct = mx.nd.zeros(1, ctx=ctx, dtype="float64")
    loss_sum = mx.nd.zeros(1, ctx=ctx, dtype="float64")
    for start, stop, logits in logit_batches(net, images, ctx, batch_size, crop):
        out = logits.astype("float32")
        y = mx.nd.array(labels[start:stop], ctx=ctx, dtype="float32")
        correct += (out.argmax(axis=1) == y).sum().astype("float64")
        loss_sum += loss_fn(out, y).sum().astype("float64")
    return np.array([correct.asscalar(), len(images), loss_sum.asscalar()], dtype=np.float64)


def evaluate(net, images: np.ndarray, labels: np.ndarray, ctx, batch_size: int, hvd=None, crop: int = 0) -> dict:
    """{'acc', 'loss', 'correct', 'total'} over the whole split; with hvd, split across its ranks."""
    import mxnet as mx

    rank, size = (hvd.rank(), hvd.size()) if hvd is not None else (0, 1)
    part = eval_slice(len(images), rank, size)
    counts = eval_counts(net, images[part], labels[part], ctx, batch_size, crop)
    if size > 1:
        counts = hvd.allreduce(mx.nd.array(counts, dtype="float64"), average=False, name="eval_counts").asnumpy()
    correct, total, loss_sum = counts
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1),
            "correct": int(round(correct)), "total": int(round(total))}
