"""The collectives outside the gradient step: rank 0's values on every rank, and averages in place.

Rank 0's values are carried by Horovod's allreduce rather than its broadcast.

Horovod 0.28.1's EnqueueTensorBroadcast writes the tensor's name to its trace log after queueing the
op, reading it from memory the op's completion frees (MXNet's engine deletes the op's parameters once
Horovod's background thread reports it done). When the background thread finishes the broadcast
first, the rank dies with SIGSEGV in an ostream insert under EnqueueTensorBroadcast. Its allreduce logs
before queueing. So a broadcast here is a sum to which every other rank adds zeros: x + 0 is x, and
the values arrive exactly (a -0.0 arrives as 0.0).
"""
from __future__ import annotations

import json
from typing import Any

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np


def broadcast_(buf: mx.nd.NDArray, root_rank: int, name: str) -> mx.nd.NDArray:
    """Overwrite BUF with root_rank's BUF on every rank (asynchronous, as Horovod's ops are); returns BUF."""
    if hvd.rank() != root_rank:
        buf[:] = 0
    hvd.allreduce_(buf, average=False, name=name)
    return buf


def broadcast(array: mx.nd.NDArray, root_rank: int, name: str) -> mx.nd.NDArray:
    """root_rank's ARRAY on every rank, in a new array."""
    return broadcast_(array.copy(), root_rank, name)


def broadcast_json(obj: Any, root_rank: int, name: str) -> Any:
    """root_rank's OBJ (what JSON holds: dicts with string keys, lists, strings, numbers, None) on every rank."""
    data = json.dumps(obj).encode() if hvd.rank() == root_rank else b""
    size = int(broadcast(mx.nd.array([len(data)], dtype="int64"), root_rank, f"{name}.size").asscalar())
    codes = np.frombuffer(data, np.uint8).astype(np.int32) if data else np.zeros(size, np.int32)
    got = broadcast(mx.nd.array(codes, dtype="int32"), root_rank, f"{name}.data").asnumpy()
    return json.loads(got.astype(np.uint8).tobytes())


def _through_buffer(arrays: dict[str, mx.nd.NDArray], op) -> None:
    """Apply op(buffer, name) to a plain-layout copy of each array, then copy the result back: an array MKLDNN
    left in its own layout is refused by Horovod (trainer.hvd_trainer)."""
    if hvd.size() == 1:
        return
    for name, arr in sorted(arrays.items()):
        buf = arr.copy()
        op(buf, name)
        buf.copyto(arr)


def average_in_place(arrays: dict[str, mx.nd.NDArray]) -> None:
    """Average each array over ranks in place (through a plain-layout copy, as above)."""
    _through_buffer(arrays, lambda buf, name: hvd.allreduce_(buf, average=True, name=name))


def broadcast_in_place(arrays: dict[str, mx.nd.NDArray], root_rank: int = 0) -> None:
    """Overwrite each array with root_rank's values (what hvd.broadcast_parameters does, MKLDNN-safe)."""
    _through_buffer(arrays, lambda buf, name: broadcast_(buf, root_rank, name))
