"""Run by test_trainer_hvd: one training step (trainer.train.train_step through DenseGradTrainer) on this
rank's part of a fixed batch of 8; rank 0 saves the parameters after it. ARGV: OUT.npz [ROWS] (ROWS: how
many of the 8 rows this world uses, split evenly over its ranks; default all 8)."""
import sys

import numpy as np

from trainer.device import context, init_horovod, set_cpu_threads

set_cpu_threads(1)
hvd = init_horovod()
import mxnet as mx  # noqa: E402
from mxnet import gluon  # noqa: E402

from trainer.collectives import broadcast_in_place  # noqa: E402
from trainer.hvd_trainer import DenseGradTrainer  # noqa: E402
from trainer.train import Model, make_objective, train_step  # noqa: E402

out, rows = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
ctx = context(hvd)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
y = rng.integers(0, 10, 8).astype(np.float32)
# no BatchNorm: its batch statistics would differ between a half and the whole batch by design
net = gluon.nn.HybridSequential()
net.add(gluon.nn.Conv2D(4, 3, activation="relu"), gluon.nn.Dense(10))
mx.random.seed(hvd.rank())  # different on each rank: the broadcast must make them equal
net.initialize(mx.init.Xavier(), ctx=ctx)
net(mx.nd.zeros((1, 3, 8, 8), ctx=ctx))
params = net.collect_params()
broadcast_in_place({f"param.{name}": p.data() for name, p in params.items()}, root_rank=0)
before = {name: p.data().asnumpy() for name, p in params.items()}
trainer = DenseGradTrainer(params, "sgd", {"learning_rate": 0.5, "momentum": 0.9, "wd": 5e-4})
per = rows // hvd.size()
part = slice(hvd.rank() * per, (hvd.rank() + 1) * per)
model = Model(net, trainer, make_objective(10, 0.1), None, 0.5, 0)
train_step(model, mx.nd.array(x[part], ctx=ctx), mx.nd.array(y[part], ctx=ctx), per)
after = {name: p.data().asnumpy() for name, p in params.items()}
if hvd.rank() == 0:
    np.savez(out, **{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()})
print(f"rank {hvd.rank()}/{hvd.size()} stepped on rows {part.start}..{part.stop}", flush=True)
