"""Run under horovodrun by test_foundation: trainer.collectives' broadcasts, checked bit for bit on every rank.

ROUNDS repeats a batch of small broadcasts (a resume's worth of parameters each) so that a broadcast racing
its own completion would have many chances to show."""
import sys

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np

from trainer.collectives import broadcast, broadcast_in_place, broadcast_json

hvd.init()
rank, rounds = hvd.rank(), int(sys.argv[1])
rng = np.random.default_rng(1234)  # the same draws on every rank: each rank knows what the root holds
for root in (0, hvd.size() - 1):
    floats = rng.standard_normal(1000).astype(np.float32)
    floats[:6] = [np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 0.0]  # non-finite, subnormal, extreme
    sent = {"f32": floats, "f64": rng.standard_normal(300), "i32": rng.integers(-2**31, 2**31, 300, dtype=np.int32),
            "i64": rng.integers(-2**62, 2**62, 300, dtype=np.int64)}
    for kind, values in sent.items():
        mine = values if rank == root else np.full_like(values, rank + 7)
        got = broadcast(mx.nd.array(mine, dtype=values.dtype), root, f"{kind}.{root}").asnumpy()
        assert got.dtype == values.dtype and got.tobytes() == values.tobytes(), f"rank {rank}: {kind} from {root} differs"
    obj = {"plan": {"skip": False, "out_dir": "/w/tune-ü", "figures": {"acc": 0.875, "n": 3}}, "code": None,
           "list": [1, 2.5, "x"]}
    got = broadcast_json(obj if rank == root else {"other": rank}, root, f"json.{root}")
    assert got == obj, f"rank {rank}: json from {root} gave {got}"

for r in range(rounds):
    arrays = {f"p{i:03d}": mx.nd.full((3, 3), float(rank * 1000 + i + r)) for i in range(100)}
    broadcast_in_place(arrays)
    mx.nd.waitall()
    wrong = [k for i, (k, a) in enumerate(sorted(arrays.items())) if not (a.asnumpy() == i + r).all()]
    assert not wrong, f"rank {rank}, round {r}: {wrong[:3]} differ from rank 0's"
print(f"rank {rank}/{hvd.size()} collectives ok, {rounds * 100} in-place broadcasts", flush=True)
