"""`cifar10-hvd train` / `python -m trainer`: Horovod data-parallel ResNet-18 training on a prepared dir.

Every rank builds the same model (rank 0's parameters broadcast), trains on its own
shard of each epoch's permutation, and averages gradients through hvd.DistributedTrainer.
Rank 0 alone writes RUN: config.json, metrics.jsonl, curves.png, checkpoints/ and the
final model. Run it under horovodrun, or alone as a world of one.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from data_prep.errors import InputError, run_command
from data_prep.schema import Parser, add_flags, resolve
from trainer import checkpoint, metrics
from trainer.config import RunRecord, TrainConfig
from trainer.device import set_cpu_threads
from trainer.schedule import base_lr, lr_at
from trainer.sharding import steps_per_epoch, train_shard

TrainError = InputError  # bad input the user must fix (a missing prepared dir, an occupied RUN): exit status 2


def build_parser() -> argparse.ArgumentParser:
    """The command line: paths and phase, then one flag per TrainConfig field."""
    p = Parser(prog="cifar10-hvd train", description=__doc__.splitlines()[0])
    p.add_argument("--prepared", required=True, help="directory written by `cifar10-hvd prepare`")
    p.add_argument("--out", required=True, help="run directory (rank 0 writes it)")
    p.add_argument("--config", help="YAML: flat TrainConfig keys, or a run config whose train: section is used")
    p.add_argument("--phase", choices=("tune", "final"), default="tune",
                   help="tune: train on train, validate each epoch; final: train on train_valid")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add_flags(p, TrainConfig)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(TrainConfig, args, args.config, "train")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: --out exists and is not a directory; choose a run directory path")
    threads = set_cpu_threads(cfg.threads)  # before anything imports mxnet
    return Training(cfg, args, threads).run()


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve the config, then train; 2 for bad input, 1 for other failures (rank named)."""
    return run_command("train", lambda: _main(argv))


def check_split(prepared: Path, split, n_classes: int) -> None:
    """The shapes training relies on: uint8 N x 32 x 32 x 3 images, one label per image, labels < n_classes.

    Checked before RUN is touched, so bad prepared data leaves no run dir that would then need --resume.
    """
    images, labels = split.images, split.labels
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise TrainError(f"{prepared}: images are {images.dtype} {'x'.join(map(str, images.shape))}, "
                         "expected uint8 N x 32 x 32 x 3; prepare it again")
    if labels is None or len(labels) != len(images):
        raise TrainError(f"{prepared}: {len(images)} images but {0 if labels is None else len(labels)} labels; "
                         "prepare it again")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise TrainError(f"{prepared}: labels outside 0..{n_classes - 1} (the manifest's classes); prepare it again")


def param_crc(net) -> int:
    """crc32 of every parameter's bytes in name order: equal on two ranks iff the models are identical."""
    crc = 0
    for name, p in sorted(net.collect_params().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(p.data().asnumpy()).tobytes(), crc)
    return crc


def versions() -> dict:
    """Versions that decide the numbers a run produces."""
    import horovod
    import mxnet as mx

    return {"python": platform.python_version(), "mxnet": mx.__version__, "horovod": horovod.__version__,
            "numpy": np.__version__}


class Training:
    """One training run: set up model, data and optimizer on this rank, then the epoch loop."""

    def __init__(self, cfg: TrainConfig, args: argparse.Namespace, threads: int):
        self.cfg, self.args, self.threads = cfg, args, threads
        self.out = Path(args.out)
        self.prepared = Path(args.prepared)
        self.phase = args.phase

    # --- setup -----------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        """Rank 0's progress line on stdout; other ranks stay quiet."""
        if self.rank == 0:
            print(msg, flush=True)

    def load_data(self) -> None:
        """The prepared splits for this phase and the class names."""
        import data_prep
        from data_prep.errors import PrepareError

        try:
            manifest = data_prep.read_manifest(self.prepared)
            self.classes = list(manifest["classes"])
            self.train_split = data_prep.open_split(self.prepared, "train" if self.phase == "tune" else "train_valid",
                                                    manifest)
            self.valid_split = data_prep.open_split(self.prepared, "valid", manifest) if self.phase == "tune" else None
        except (OSError, ValueError, KeyError, PrepareError) as e:
            raise TrainError(f"{self.prepared}: cannot read the prepared data: {e}") from e
        for split in (self.train_split, self.valid_split):
            if split is not None:
                check_split(self.prepared, split, len(self.classes))
        n = len(self.train_split.images)
        self.steps = steps_per_epoch(n, self.cfg.batch_size, self.size)
        if self.steps == 0:
            raise TrainError(f"{self.prepared}: {n} training images are fewer than one global batch "
                             f"({self.cfg.batch_size} x {self.size} ranks); lower --batch-size")

    def check_out_dir(self) -> None:
        """Refuse to overwrite a run without --resume (rank 0 decides; every rank gets the verdict)."""
        import mxnet as mx

        bad = 0.0
        if self.rank == 0:
            has_run = (self.out / metrics.METRICS).exists() or bool(checkpoint.list_checkpoints(self.out)) \
                or (self.out / checkpoint.FINAL_PARAMS).exists()
            bad = float(has_run and not self.args.resume)
        bad = self.hvd.broadcast(mx.nd.array([bad]), root_rank=0, name="out_dir_check").asscalar()
        if bad:
            raise TrainError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")

    def build(self) -> None:
        """Model (identical on every rank), optimizer, and the resume point."""
        import mxnet as mx
        from mxnet import gluon

        from trainer.hvd_trainer import DenseGradTrainer, broadcast_in_place
        from trainer.model import resnet18

        cfg = self.cfg
        self.amp = None
        if cfg.amp != "none":
            from mxnet.contrib import amp

            self.amp = amp
            amp.init(target_dtype=cfg.amp)
        mx.random.seed(cfg.seed)
        self.net = resnet18(len(self.classes), cfg.width)
        self.net.initialize(mx.init.Xavier(), ctx=self.ctx)
        self.net.hybridize(static_alloc=True)
        self.net(mx.nd.zeros((1, 3, 32, 32), ctx=self.ctx))  # materialise deferred shapes before broadcasting

        # rank 0 picks the checkpoint (-1: it belongs to the other phase); every rank loads that one
        ck = checkpoint.latest_checkpoint(self.out) if (self.args.resume and self.rank == 0) else None
        pick = (-1 if ck.get("phase", self.phase) != self.phase else ck["epoch"]) if ck else 0
        self.start_epoch = int(self.hvd.broadcast(mx.nd.array([pick]), root_rank=0, name="resume_epoch").asscalar())
        if self.start_epoch < 0:
            raise TrainError(f"{self.out}: its checkpoints are not from --phase {self.phase}; use one --out per phase")
        stem = checkpoint.checkpoint_stem(self.out, self.start_epoch)
        if self.start_epoch:
            try:
                self.net.load_parameters(str(stem.with_suffix(".params")), ctx=self.ctx)
            except (OSError, mx.base.MXNetError, AssertionError) as e:
                raise TrainError(f"{stem}.params: cannot resume from it with width {cfg.width}: {e}") from e
        params = self.net.collect_params()
        # hvd.broadcast_parameters, through plain-layout copies (see trainer.hvd_trainer)
        broadcast_in_place({f"param.{name}": p.data() for name, p in params.items()}, root_rank=0)

        self.lr = base_lr(cfg, self.size)
        self.trainer = DenseGradTrainer(params, "sgd",
                                        {"learning_rate": self.lr, "momentum": cfg.momentum, "wd": cfg.wd})
        if cfg.amp == "float16":
            self.amp.init_trainer(self.trainer)
        if self.start_epoch:
            self.trainer.load_states(str(stem.with_suffix(".states")))
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=cfg.label_smoothing == 0)

    def write_config(self) -> None:
        """RUN/config.json: everything needed to reproduce and to predict with this run."""
        if self.rank != 0:
            return
        record = RunRecord(train=self.cfg, classes=self.classes, phase=self.phase, prepared=str(self.prepared.resolve()),
                           world_size=self.size, global_batch=self.cfg.batch_size * self.size, lr=self.lr,
                           threads_per_rank=self.threads, versions=versions())
        checkpoint.atomic_write_text(self.out / checkpoint.RUN_CONFIG, record.to_json())

    # --- the loop --------------------------------------------------------------------------------------

    def batches(self, epoch: int):
        """This rank's stream of (x, y) for the epoch, from the configured pipeline."""
        from trainer.pipeline import batched_stream, seed_stream

        split = self.train_split
        shard = train_shard(len(split.images), self.cfg.batch_size, self.rank, self.size, self.cfg.seed, epoch)
        if self.cfg.pipeline == "seed":
            import random

            import mxnet as mx

            # gluon's crop draws from Python's random, its flip from MXNet's generator
            random.seed(f"{self.cfg.seed}-{epoch}-{self.rank}")
            mx.random.seed(self.cfg.seed * 1000003 + epoch * 101 + self.rank)
            return seed_stream(split.images, split.labels, shard)
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, 1])
        return batched_stream(split.images, split.labels, shard, rng)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's shard; returns the global loss, accuracy and speed."""
        import mxnet as mx
        from mxnet import autograd

        cfg, ctx = self.cfg, self.ctx
        loss_sum = mx.nd.zeros(1, ctx=ctx)
        correct = mx.nd.zeros(1, ctx=ctx)
        in_flight: collections.deque = collections.deque()
        bar = None
        if self.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.batches(epoch)):
            self.trainer.set_learning_rate(lr_at(cfg, epoch + step / self.steps, self.size))
            X = x.as_in_context(ctx) if isinstance(x, mx.nd.NDArray) else mx.nd.array(x, ctx=ctx)
            Y = y.as_in_context(ctx) if isinstance(y, mx.nd.NDArray) else mx.nd.array(y, ctx=ctx)
            target = Y
            if cfg.label_smoothing:
                k, eps = len(self.classes), cfg.label_smoothing
                target = mx.nd.one_hot(Y, k, on_value=1 - eps + eps / k, off_value=eps / k)
            with autograd.record():
                out = self.net(X).astype("float32")
                loss = self.loss_fn(out, target)
            if cfg.amp == "float16":
                with self.amp.scale_loss(loss, self.trainer) as scaled:
                    autograd.backward(scaled)
            else:
                loss.backward()
            self.trainer.step(cfg.batch_size)
            loss_sum += loss.sum()
            correct += (out.argmax(axis=1) == Y).sum()
            # MXNet runs ahead asynchronously; bound it to two steps so memory stays flat
            in_flight.append(loss)
            if len(in_flight) > 2:
                in_flight.popleft().wait_to_read()
            if bar is not None:
                bar.update(1)
        mx.nd.waitall()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        images = self.steps * cfg.batch_size
        local = mx.nd.array([loss_sum.asscalar(), correct.asscalar(), images, self.steps, seconds], dtype="float64")
        totals = self.hvd.allgather(local.reshape((1, -1)), name="train_totals").asnumpy()
        n = totals[:, 2].sum()
        return {"train_loss": totals[:, 0].sum() / n, "train_acc": totals[:, 1].sum() / n,
                "images_per_sec": n / totals[:, 4].max(), "steps_per_rank": totals[:, 3].astype(int).tolist()}

    def sync_batchnorm_stats(self) -> None:
        """Average BatchNorm running statistics over ranks (each saw only its shard): one model everywhere."""
        from trainer.hvd_trainer import average_in_place

        average_in_place({f"aux.{name}": p.data() for name, p in self.net.collect_params().items()
                          if p.grad_req == "null"})

    def run(self) -> int:
        """Set up, train the remaining epochs, write the final model; 0 on success."""
        from trainer.device import context, init_horovod

        self.hvd = hvd = init_horovod()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.ctx = context(hvd)
        cfg = self.cfg
        self.load_data()  # inputs checked before anything is written to RUN
        self.check_out_dir()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.build()
        self.write_config()
        self.log(f"train: phase {self.phase}, {len(self.train_split.images)} images, world size {self.size} "
                 f"({self.threads} threads/rank, {self.ctx}), per-rank batch {cfg.batch_size}, "
                 f"global batch {cfg.batch_size * self.size}, lr {self.lr:g}, {self.steps} steps/epoch, "
                 f"pipeline {cfg.pipeline}, amp {cfg.amp}")
        history: list[dict] = []
        if self.rank == 0:
            history = metrics.truncate_metrics(self.out, self.start_epoch)
        if self.start_epoch:
            self.log(f"resuming at epoch {self.start_epoch + 1} from {self.out / checkpoint.CHECKPOINT_DIR}")
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = lr_at(cfg, epoch, self.size)
            record = self.train_epoch(epoch)
            self.sync_batchnorm_stats()
            valid = None
            if self.valid_split is not None:
                from trainer.evaluate import evaluate

                valid = evaluate(self.net, self.valid_split.images, self.valid_split.labels, self.ctx,
                                 cfg.eval_batch_size, hvd, crop=cfg.eval_crop)
            record = {"epoch": epoch, "phase": self.phase, "lr": lr, **record,
                      "valid_acc": valid["acc"] if valid else None, "valid_loss": valid["loss"] if valid else None,
                      "epoch_seconds": time.perf_counter() - t0}
            if self.rank == 0:
                metrics.append_metrics(self.out, record)
                history.append(record)
                metrics.plot_curves(self.out, history)
                checkpoint.save_checkpoint(self.out, epoch + 1, self.net, self.trainer,
                                           {"phase": self.phase, "lr": lr, "world_size": self.size,
                                            "global_batch": cfg.batch_size * self.size}, cfg.keep_checkpoints)
                valid_txt = f" valid_acc {valid['acc']:.4f}" if valid else ""
                self.log(f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.4g} train_loss {record['train_loss']:.4f} "
                         f"train_acc {record['train_acc']:.4f}{valid_txt} {record['images_per_sec']:.0f} img/s "
                         f"{record['epoch_seconds']:.1f}s")
        self.finish()
        return 0

    def finish(self) -> None:
        """Check all ranks hold the same model, then rank 0 writes model-final.params and the export."""
        import mxnet as mx

        crcs = self.hvd.allgather(mx.nd.array([[param_crc(self.net)]], dtype="float64"), name="param_crc").asnumpy()
        crcs = [int(c) for c in crcs[:, 0]]
        self.log("param crc32 by rank: " + " ".join(f"{c:08x}" for c in crcs))
        if len(set(crcs)) != 1:
            raise RuntimeError(f"ranks ended with different parameters (crc32 by rank: {crcs})")
        if self.rank != 0:
            return
        checkpoint.atomic_write(self.out / checkpoint.FINAL_PARAMS, self.net.save_parameters)
        tmp = self.out / f".export-{os.getpid()}"
        tmp.mkdir()
        self.net.export(str(tmp / "model"))
        for name in ("model-symbol.json", "model-0000.params"):
            os.replace(tmp / name, self.out / name)
        tmp.rmdir()
        self.log(f"wrote {self.out / checkpoint.FINAL_PARAMS} and {self.out / 'model-symbol.json'}")
