"""Run under horovodrun by test_foundation: broadcast from rank 0 and allreduce, checked on every rank."""
import sys

import horovod.mxnet as hvd
import mxnet as mx

hvd.init()
rank, size = hvd.rank(), hvd.size()
x = mx.nd.full((4,), rank + 10.0)
hvd.broadcast_(x, root_rank=0, name="bcast")
assert (x.asnumpy() == 10.0).all(), f"rank {rank}: broadcast gave {x.asnumpy()}"
y = hvd.allreduce(mx.nd.full((3,), float(rank + 1)), average=False, name="sum")
expected = size * (size + 1) / 2
assert (y.asnumpy() == expected).all(), f"rank {rank}: allreduce gave {y.asnumpy()}, expected {expected}"
print(f"rank {rank}/{size} ok broadcast=10 allreduce={expected:g}", flush=True)
sys.exit(0)
