"""Horovod's gradient averaging, with the MKLDNN-safe buffers CPU ranks need.

With MXNet's MKLDNN backend a gradient, or a weight after a forward pass, may be in an
MKLDNN memory layout (possibly set asynchronously, after Horovod has looked at it when
the op was enqueued); Horovod's op then fails ("We can't generate TBlob for MKLDNN data").
Copying into a buffer first is an engine op, ordered after the writer, that always yields
the default layout; the reduced buffer is copied back. Costs two memcpys of the gradients
per step, negligible beside the convolutions on CPU. GPU arrays have no MKLDNN layouts, so GPU
ranks use Horovod's own DistributedTrainer path (no copies; grouped allreduce with num_groups).
"""
from __future__ import annotations

import horovod.mxnet as hvd
import mxnet as mx

COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}


def gradient_path(device_type: str) -> str:
    """'buffered' (plain-layout copies) for CPU gradients, where MKLDNN layouts break Horovod; else 'horovod'."""
    return "buffered" if device_type == "cpu" else "horovod"


def compressor(name: str):
    """hvd.Compression.<name> for the train config's `compression` key (none, fp16)."""
    try:
        return COMPRESSIONS[name]
    except KeyError:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}") from None


class DenseGradTrainer(hvd.DistributedTrainer):
    """DistributedTrainer (averaging gradients over ranks): Horovod's own path on GPU, plain-layout buffers on CPU.

    Both paths apply the trainer's `compression` (hvd.Compression.fp16 halves the bytes on the wire).
    """

    _buffers: dict[int, mx.nd.NDArray] | None = None

    def _allreduce_grads(self):
        if hvd.size() == 1:
            return
        grads = [p for p in self._params if p.grad_req != "null"]
        if grads and gradient_path(grads[0].list_grad()[0].context.device_type) == "horovod":
            return super()._allreduce_grads()
        if self._buffers is None:
            self._buffers = {i: mx.nd.zeros(p.shape, ctx=p.list_grad()[0].context, dtype=p.dtype)
                             for i, p in enumerate(self._params) if p.grad_req != "null"}
        for i, buf in self._buffers.items():
            grad = self._params[i].list_grad()[0]
            grad.copyto(buf)
            wire, meta = self._compression.compress(buf)
            hvd.allreduce_(wire, average=not self._average_in_framework, name=f"{self._prefix}grad.{i}", priority=-i,
                           prescale_factor=1.0 / self._gradient_predivide_factor,
                           postscale_factor=self._postscale_factor)
            self._compression.decompress(wire, meta).copyto(grad)

