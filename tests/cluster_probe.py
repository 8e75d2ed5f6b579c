"""Run under horovodrun across cluster hosts by test_cluster: what the trainer's own start-up decides on each
rank (threads by trainer.device's per-host rule, local rank, this epoch's shard by trainer.sharding), as JSON."""
import json
import os
import socket
import sys
from pathlib import Path

from trainer.device import init_horovod, set_cpu_threads
from trainer.sharding import train_shard

out, n, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
threads = set_cpu_threads(0)  # what `train` does with threads: 0, before MXNet starts
hvd = init_horovod()
shard = train_shard(n, batch, hvd.rank(), hvd.size(), seed=0, epoch=1)
record = {"host": socket.gethostname(), "rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
          "local_size": hvd.local_size(), "threads": threads, "omp": os.environ["OMP_NUM_THREADS"],
          "cpus": os.cpu_count(), "shard": shard.reshape(-1).tolist()}
(out / f"rank{hvd.rank()}.json").write_text(json.dumps(record))
hvd.allreduce_(__import__("mxnet").nd.zeros(1), name="done")  # every rank wrote before any exits
