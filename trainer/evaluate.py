"""Exact accuracy and loss on an eval split: each rank scores a contiguous slice, counts are summed.

The per-image result does not depend on the batch it is in (trainer.inference), so the
allreduced counts equal a one-process evaluation.
"""
from __future__ import annotations

import numpy as np

from trainer.inference import forward_batches, view_logits
from trainer.sharding import eval_slice


def eval_counts(net, images: np.ndarray, labels: np.ndarray, ctx, batch_size: int, crop: int = 0,
                tta: str = "none") -> np.ndarray:
    """[correct, total, loss_sum, plain_correct] (float64) of net over images/labels, seen through
    eval_transform(crop) and the tta view; plain_correct counts the unflipped view alone (from the same forward)."""
    import mxnet as mx
    from mxnet import gluon

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    counts = [mx.nd.zeros(1, ctx=ctx, dtype="float64") for _ in range(3)]
    for start, stop, (plain, logits) in forward_batches(lambda x: view_logits(net, x, tta), images, ctx, batch_size, crop):
        y = mx.nd.array(labels[start:stop], ctx=ctx, dtype="float32")
        out = logits[: stop - start].astype("float32")
        counts[0] += (out.argmax(axis=1) == y).sum().astype("float64")
        counts[1] += loss_fn(out, y).sum().astype("float64")
        counts[2] += (plain[: stop - start].argmax(axis=1) == y).sum().astype("float64")
    correct, loss_sum, plain_correct = (c.asscalar() for c in counts)
    return np.array([correct, len(images), loss_sum, plain_correct], dtype=np.float64)


def evaluate(net, images: np.ndarray, labels: np.ndarray, ctx, batch_size: int, hvd=None, crop: int = 0,
             tta: str = "none") -> dict:
    """{'acc', 'loss', 'correct', 'total', 'plain_acc'} over the whole split in the tta view (plain_acc:
    without it); with hvd, split across its ranks."""
    import mxnet as mx

    rank, size = (hvd.rank(), hvd.size()) if hvd is not None else (0, 1)
    part = eval_slice(len(images), rank, size)
    counts = eval_counts(net, images[part], labels[part], ctx, batch_size, crop, tta)
    if size > 1:
        counts = hvd.allreduce(mx.nd.array(counts, dtype="float64"), average=False, name="eval_counts").asnumpy()
    correct, total, loss_sum, plain_correct = counts
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1),
            "correct": int(round(correct)), "total": int(round(total)), "plain_acc": plain_correct / max(total, 1)}
