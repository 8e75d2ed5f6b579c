"""A Horovod job for tests/test_watchdog.py and the cluster tests: each rank allreduces a small tensor every
STEP seconds for SECONDS, with its pid in OUT/rank{R}.pid; `wait0` makes rank 0 sleep SECONDS outside any
collective while rank 1 waits in one (a long checkpoint or evaluation); `early` ends rank 1 after its first
steps while rank 0 goes on alone. Each rank then writes OUT/rank{R}.json with the longest pause it heard."""
import json
import sys
import time
from pathlib import Path

from trainer.device import init_horovod, set_cpu_threads

out, seconds, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "steps"
set_cpu_threads(1)
hvd = init_horovod("train")
import mxnet as mx  # noqa: E402  (after Horovod's start, as the trainer does)

from trainer import watchdog  # noqa: E402

rank = hvd.rank()
(out / f"rank{rank}.pid").write_text(str(__import__("os").getpid()))
x = mx.nd.ones((64,))
hvd.allreduce(x, name="probe.start").asnumpy()
end = time.time() + seconds
if mode == "wait0":
    if rank == 0:
        time.sleep(seconds)
    hvd.allreduce(x, name="probe.after_wait").asnumpy()  # rank 1 waits here the whole time
elif mode == "early":
    pass  # rank 1 ends now; rank 0 works on alone below
else:
    step = 0
    while time.time() < end:
        hvd.allreduce(x, name=f"probe.{step}").asnumpy()
        step += 1
        time.sleep(0.05)
if mode == "early" and rank == 0:
    time.sleep(seconds)
wd = watchdog.current()
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "longest_pause": wd.longest_pause if wd else None}))
print(f"rank {rank} done", flush=True)
