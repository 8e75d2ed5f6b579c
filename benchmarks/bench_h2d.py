"""Host-to-device copy: the training step loop and the inference loop, with and without the overlapped copy.

Side by side in one process, on whatever device is present (mx.gpu(0) if MXNet sees one, else the CPU),
interleaved repeats so a shared machine's noise hits both alike; wall-clock and CPU-time figures:
  train  sync:   mx.nd.array(x, ctx) per step (the copy blocks Python; from pageable memory on GPU)
         staged: trainer.prefetch (pinned ring, batch k+1's copy queued before batch k's step)
  infer  sync:   transform, mx.nd.array, forward, wait, per batch (no overlap)
         staged: trainer.inference.logit_batches (batch k+1 transformed and copied during batch k's forward)
  copy   the copy alone, waited for (us per batch; on CPU staged does two memcpys, the sync path one)
On CPU the step ratio shows that the staged path costs nothing; on a GPU it shows the gain.

    .venv/bin/python benchmarks/bench_h2d.py [--width 16] [--batch-size 128] [--steps 40] [--repeats 3]
                                             [--threads 0] [--amp none|float16|bfloat16] [--skip-infer]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.device import set_cpu_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed training steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each variant")
    p.add_argument("--threads", type=int, default=0, help="OMP threads (0 = all cores)")
    p.add_argument("--amp", default="none", choices=("none", "float16", "bfloat16"))
    p.add_argument("--infer-batches", type=int, default=20, help="timed inference batches (of 512) per run")
    p.add_argument("--skip-infer", action="store_true")
    return p.parse_args(argv)


class Setup:
    """One model, trainer and image set shared by every run, so the variants differ only in the copy."""

    def __init__(self, args: argparse.Namespace):
        import mxnet as mx
        import numpy as np
        from mxnet import gluon

        from trainer.device import context, device_problem, init_horovod
        from trainer.hvd_trainer import DenseGradTrainer
        from trainer.model import resnet18

        self.hvd = init_horovod()
        self.ctx = context(self.hvd)
        problem = device_problem(args.amp, self.ctx)
        if problem:
            raise SystemExit(f"bench_h2d: {problem}")
        self.amp = None
        if args.amp != "none":
            from mxnet.contrib import amp

            amp.init(target_dtype=args.amp)
            self.amp = amp
        self.args = args
        self.net = resnet18(10, args.width)
        self.net.initialize(mx.init.Xavier(), ctx=self.ctx)
        self.net.hybridize(static_alloc=True)
        self.trainer = DenseGradTrainer(self.net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
        if args.amp == "float16":
            self.amp.init_trainer(self.trainer)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        rng = np.random.default_rng(0)
        n = args.batch_size * args.steps
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, n).astype(np.float32)
        self.shard = np.arange(n).reshape(args.steps, args.batch_size)
        self.infer_images = rng.integers(0, 256, (512 * args.infer_batches, 32, 32, 3), dtype=np.uint8)

    def step(self, X, Y):
        from mxnet import autograd

        with autograd.record():
            loss = self.loss_fn(self.net(X).astype("float32"), Y)
        if self.args.amp == "float16":
            with self.amp.scale_loss(loss, self.trainer) as scaled:
                autograd.backward(scaled)
        else:
            loss.backward()
        self.trainer.step(self.args.batch_size)
        return loss

    def batches(self, seed: int):
        import numpy as np

        from trainer.pipeline import batched_stream

        return batched_stream(self.images, self.labels, self.shard, np.random.default_rng(seed))

    def train(self, staged_copy: bool) -> float:
        """Images/s of the step loop over args.steps batches (the trainer's loop, in-flight bound 2)."""
        import collections

        import mxnet as mx

        from trainer.prefetch import CopyRing, prefetched

        mx.nd.waitall()
        start, cpu = time.perf_counter(), time.process_time()
        in_flight: collections.deque = collections.deque()
        if staged_copy:
            stream = prefetched(self.batches(1), CopyRing(self.ctx))
        else:
            stream = ((mx.nd.array(x, ctx=self.ctx), mx.nd.array(y, ctx=self.ctx)) for x, y in self.batches(1))
        for X, Y in stream:
            in_flight.append(self.step(X, Y))
            if len(in_flight) > 2:
                in_flight.popleft().wait_to_read()
        mx.nd.waitall()
        return self.shard.size / (time.perf_counter() - start), self.shard.size / (time.process_time() - cpu)

    def infer(self, staged_copy: bool) -> float:
        """Images/s of predict's loop (eval_transform, forward, argmax to host) over infer_batches x 512 images."""
        import mxnet as mx
        import numpy as np

        from trainer.inference import logit_batches
        from trainer.presets import eval_transform

        images = self.infer_images
        start, cpu = time.perf_counter(), time.process_time()
        if staged_copy:
            for _, _, logits in logit_batches(self.net, images, self.ctx, 512):
                logits.argmax(axis=1).asnumpy()
        else:
            buf = np.zeros((512, 3, 32, 32), dtype=np.float32)
            for s in range(0, len(images), 512):
                eval_transform(images[s:s + 512], 0, out=buf)
                self.net(mx.nd.array(buf, ctx=self.ctx)).argmax(axis=1).asnumpy()
        return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


    def copy(self, staged_copy: bool) -> float:
        """Microseconds per batch for the copy alone (x and y to the device, waited for), over one epoch's batches."""
        import mxnet as mx

        from trainer.prefetch import CopyRing

        ring = CopyRing(self.ctx)
        batches = list(self.batches(2))[:8]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(10):
            for x, y in batches:
                X = ring.put(x, y)[0] if staged_copy else mx.nd.array(x, ctx=self.ctx)
                Y = None if staged_copy else mx.nd.array(y, ctx=self.ctx)
                X.wait_to_read()
                del Y
        n = 10 * len(batches)
        return 1e6 * (time.perf_counter() - start) / n, 1e6 * (time.process_time() - cpu) / n


def compare(name: str, run, repeats: int, unit: str = "img/s") -> None:
    """Warm both variants, then interleave them; print best and median of the wall-clock and the CPU-time
    figures (this process's CPU seconds: less sensitive to other loads on a shared machine), and staged/sync."""
    run(False), run(True)
    got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(repeats):
        for staged_copy in ((False, True) if i % 2 == 0 else (True, False)):
            got[staged_copy].append(run(staged_copy))
    best = min if unit == "us" else max  # a time per batch: the least is the best
    for j, clock in enumerate(("wall", "cpu ")):
        for staged_copy, label in ((False, "sync  "), (True, "staged")):
            v = [r[j] for r in got[staged_copy]]
            print(f"{name} {clock} {label}: best {best(v):8.1f} {unit}, median {statistics.median(v):8.1f} "
                  f"({', '.join(f'{x:.1f}' for x in v)})")
        a, b = ([r[j] for r in got[k]] for k in (True, False))
        print(f"{name} {clock} staged/sync: best {best(a) / best(b):.3f}, median {statistics.median(a) / statistics.median(b):.3f}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_cpu_threads(args.threads)
    setup = Setup(args)
    print(f"bench_h2d: {setup.ctx}, width {args.width}, batch {args.batch_size}, {args.steps} steps, amp {args.amp}, "
          f"{threads} OMP threads, {args.repeats} interleaved repeats", flush=True)
    compare("copy", setup.copy, args.repeats, unit="us")
    compare("train", setup.train, args.repeats)
    if not args.skip_infer:
        setup.net.hybridize()  # predict's hybridization (no static_alloc)
        compare("infer", setup.infer, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
