"""`cifar10-hvd train` / `python -m trainer`: Horovod data-parallel ResNet-18 training on a prepared dir.

Every rank builds the same model (rank 0's parameters broadcast), trains on its own
shard of each epoch's permutation, and averages gradients through hvd.DistributedTrainer.
Rank 0 alone writes RUN: config.json, metrics.jsonl, curves.png, checkpoints/ and the
final model. Run it under horovodrun, or alone as a world of one.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.errors import InputError, run_command
from contracts.lock import DIR_LOCK, Lock, lock_dir
from contracts.schema import Parser, add_flags, resolve
from trainer import budget, curves, rundir
from trainer.config import RunRecord, TrainConfig, from_mapping, resume_changes
from trainer.device import device_problem, set_cpu_threads
from trainer.ema import EMA_SUFFIX, WeightAverage, averaged, checkpoint_files
from trainer.export import write_final_model
from trainer.inputs import verify_prepared
from trainer.precision import loss_scale_state
from trainer.recipe import WHITEN_IMAGES, check_recipe, freeze_stem, optimizer_spec, prepare_net, train_size, whiten_stem
from trainer.schedule import base_lr, lr_at, validates
from trainer.sharding import steps_per_epoch, train_shard


def build_parser() -> argparse.ArgumentParser:
    """The command line: paths and phase, then one flag per TrainConfig field."""
    p = Parser(prog="cifar10-hvd train", description=__doc__.splitlines()[0])
    p.add_argument("--prepared", required=True, help="directory written by `cifar10-hvd prepare`")
    p.add_argument("--out", required=True, help="run directory (rank 0 writes it)")
    p.add_argument("--config", help="YAML: flat TrainConfig keys, or a run config whose train: section is used")
    p.add_argument("--phase", choices=("tune", "final"), default="tune",
                   help="tune: train on train, validate each epoch; final: train on train_valid")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out, with the run's own training keys")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="--resume, allowed to change training keys (lr, batch, schedule, ...); config.json records "
                        "each change and the epoch it began")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the prepared files against their manifest first (sizes are always checked)")
    add_flags(p, TrainConfig)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(TrainConfig, args, args.config, "train")
    threads = set_cpu_threads(cfg.threads)  # before anything imports mxnet
    train(args.prepared, args.out, cfg, phase=args.phase, resume=args.resume or args.resume_with_changes,
          threads=threads, verify=args.verify, allow_changes=args.resume_with_changes)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve the config, then train; 2 for bad input, 1 for other failures (rank named)."""
    return run_command("train", lambda: _main(argv))


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


@dataclass
class RunSummary:
    """What a finished `train` returns on every rank; history (the run's metrics rows) is rank 0's alone."""

    out: str
    phase: str
    epochs: int
    start_epoch: int
    world_size: int
    final_params: str
    history: list[dict] = field(default_factory=list)

    def figures(self) -> dict:
        """The launcher's summary.json figures for this stage, from the history (no file read)."""
        return run_figures(self.phase, self.history)


def run_figures(phase: str, rows: list[dict]) -> dict:
    """Figures of a run from its metrics rows: epochs done, last loss and accuracy, mean speed, (tune) valid accuracy."""
    if not rows:
        return {"epochs": 0}
    fig = {"epochs": rows[-1]["epoch"] + 1,  # metrics count epochs from 0
           "train_loss": rows[-1]["train_loss"], "train_acc": rows[-1]["train_acc"],
           "images_per_sec": round(sum(r["images_per_sec"] for r in rows) / len(rows), 1),
           "train_seconds": round(sum(r["epoch_seconds"] for r in rows), 2)}
    if phase == "tune":
        fig["valid_acc"] = rows[-1]["valid_acc"]
        fig["best_valid_acc"] = max(r["valid_acc"] for r in rows if r["valid_acc"] is not None)
    return fig


@dataclass
class Data:
    """The phase's prepared splits, checked: train (train or train_valid), valid (tune only), the classes."""

    classes: list[str]
    train: object
    valid: object | None
    steps: int


@dataclass
class Model:
    """What one training step needs: the net, its optimizer, the objective, AMP (or None), and where it starts."""

    net: object
    trainer: object
    objective: object
    amp: object | None
    lr: float
    start_epoch: int
    scale_loss: bool = False  # float16 AMP: backward through amp.scale_loss
    ema: object | None = None  # trainer.ema.WeightAverage when cfg.ema is on
    changes: list[dict] = field(default_factory=list)  # rank 0: the run's training changes, for config.json
    epochs: int = 0  # resumed: the count of epochs the run trains (under a time budget, its decided one)


@dataclass
class World:
    """This rank's place: horovod, its rank and size, and its device context."""

    hvd: object
    rank: int
    size: int
    ctx: object

    def log(self, msg: str) -> None:
        """Rank 0's progress line on stdout; other ranks stay quiet."""
        if self.rank == 0:
            print(msg, flush=True)


def init_world() -> World:
    """Horovod initialised, with this rank's device context."""
    from trainer.device import context, init_horovod

    hvd = init_horovod()
    return World(hvd, hvd.rank(), hvd.size(), context(hvd))


# --- setup -------------------------------------------------------------------------------------------

def load_data(prepared: Path, phase: str, cfg: TrainConfig, size: int) -> Data:
    """The prepared splits for this phase and the class names, checked before RUN is touched."""
    import data_prep
    from contracts.errors import InputError

    try:
        manifest = data_prep.read_manifest(prepared)
        classes = list(manifest["classes"])
        train_split = data_prep.open_split(prepared, "train" if phase == "tune" else "train_valid", manifest)
        valid_split = data_prep.open_split(prepared, "valid", manifest) if phase == "tune" else None
    except (OSError, ValueError, KeyError, InputError) as e:
        raise InputError(f"{prepared}: cannot read the prepared data: {e}") from e
    n = len(train_split.images)
    steps = steps_per_epoch(n, cfg.batch_size, size)
    if steps == 0:
        raise InputError(f"{prepared}: {n} training images are fewer than one global batch "
                         f"({cfg.batch_size} x {size} ranks); lower --batch-size")
    return Data(classes, train_split, valid_split, steps)


def check_out_dir(out: Path, resume: bool, world: World) -> Lock:
    """Take RUN's writer lock, and refuse to overwrite a run without --resume (rank 0 decides; every rank
    gets the verdict). Only rank 0 writes RUN, so only rank 0 locks it; the others get an unheld Lock."""
    lock, bad, busy = Lock(out / DIR_LOCK, -1), 0.0, ""
    if world.rank == 0:
        try:
            lock = lock_dir(out, "run directory")
        except InputError as e:  # another writer holds RUN: "in use by pid N on host H"
            busy, bad = str(e), 2.0
        bad = bad or float(rundir.holds_run(out) and not resume)
    verdict = broadcast_scalar(bad, "out_dir_check")
    if verdict:
        lock.release()
    if verdict == 2:
        raise InputError(busy or f"{out}: rank 0 could not take the run directory's lock")
    if verdict:
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return lock


def broadcast_scalar(value: float, name: str) -> float:
    """Rank 0's value on every rank."""
    import mxnet as mx

    from trainer.collectives import broadcast

    return float(broadcast(mx.nd.array([value]), 0, name).asscalar())


def build_net(cfg: TrainConfig, n_classes: int, ctx, stem_images=None):
    """ResNet-18 as cfg's model keys shape it, initialised from cfg.seed and hybridized, shapes materialised.
    With stem_init whiten the stem is frozen, and whitened from stem_images where given (rank 0: the other
    ranks receive its parameters)."""
    import mxnet as mx

    from trainer.model import from_config

    mx.random.seed(cfg.seed)
    net = from_config(cfg, n_classes)
    if cfg.stem_init == "whiten":
        freeze_stem(net)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net.hybridize(static_alloc=True)
    net(mx.nd.zeros((1, 3, 32, 32), ctx=ctx))  # materialise deferred shapes before broadcasting
    prepare_net(net, cfg)
    if cfg.stem_init == "whiten" and stem_images is not None:
        whiten_stem(net, stem_images)
    return net


@dataclass
class Resume:
    """Where this rank starts: the epoch; on rank 0 also what it loaded from the checkpoint (into net and the
    fresh optimizer state) and the run's history of training changes."""

    epoch: int = 0
    record: dict | None = None
    num_update: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    ema: object | None = None
    changes: list[dict] = field(default_factory=list)
    epochs: int = 0  # the count of epochs the resumed run trains (a budgeted run's decided one), on every rank


def resume_point(out: Path, phase: str, cfg: TrainConfig, world: World, allow_changes: bool, net,
                 states: dict | None) -> Resume:
    """Rank 0 picks the newest intact checkpoint, checks that it may continue this run and loads it; every rank
    learns the epoch to start at and the count of epochs, or the refusal (InputError on every rank, rank 0's naming
    the reason)."""
    point, problem = Resume(), ""
    if states is not None and world.rank == 0:
        try:
            point = load_resume(out, phase, cfg, world, allow_changes, net, states)
        except InputError as e:
            problem = str(e)
    start = broadcast_scalar(-1 if problem else point.epoch, "resume_epoch")
    if start < 0:
        raise InputError(problem or f"{out}: rank 0 could not resume this run (its message says why)")
    epochs = int(broadcast_scalar(point.epochs, "resume_epochs"))
    return point if world.rank == 0 else Resume(int(start), epochs=epochs)


def pick_checkpoint(out: Path, phase: str) -> rundir.Checkpoint | None:
    """The newest intact checkpoint (None in a run without any); each damaged newer one is named on stderr, and
    none intact is a InputError naming them all."""
    ck, damaged = rundir.intact_checkpoint(out)
    if damaged and ck is None:
        raise InputError(f"{out}: no intact checkpoint to resume from:\n  " + "\n  ".join(damaged))
    for why in damaged:
        print(f"cifar10-hvd train: damaged checkpoint: {why}", file=sys.stderr)
    if damaged:
        print(f"cifar10-hvd train: falling back to {ck.stem.name}, the newest intact checkpoint "
              f"(resuming at epoch {ck.epoch + 1})", file=sys.stderr, flush=True)
    if ck is not None and ck.record.get("phase", phase) != phase:
        raise InputError(f"{out}: its checkpoints are not from --phase {phase}; use one --out per phase")
    return ck


def load_resume(out: Path, phase: str, cfg: TrainConfig, world: World, allow_changes: bool, net,
                states: dict) -> Resume:
    """Rank 0's part of resume_point: the checkpoint's parameters into net, its optimizer state into states,
    its weight average; nothing of it is read before its sha256 is checked."""
    ck = pick_checkpoint(out, phase)
    if ck is None:
        return Resume()
    old = from_mapping(TrainConfig, ck.record.get("train"), f"{ck.path('.json')} (train)")
    cfg = budget.kept(cfg, old)
    changes = training_changes(out, ck, old, cfg, world.size, allow_changes)
    load_checkpoint_params(net, ck.stem, cfg, world.ctx)
    num_update, counts = rundir.fill_optimizer_state(states, ck)
    return Resume(ck.epoch, ck.record, num_update, counts, read_average(net, cfg, ck), changes, cfg.epochs)


def describe_change(change: dict, cfg: TrainConfig) -> str:
    """One change for a message: `lr 0.1 -> 0.5`, with what a derived key stands for."""
    key, old, new = change["key"], change["old"], change["new"]
    if key == "global_batch":
        return f"batch_size: the global batch (batch_size x ranks) {old} -> {new}"
    if key == "epochs":
        return f"epochs {old} -> {new} (the {cfg.schedule} schedule decays the lr to 0 at the last epoch)"
    return f"{key} {old:g} -> {new:g}" if key == "lr" else f"{key} {old} -> {new}"


def training_changes(out: Path, ck: rundir.Checkpoint, old: TrainConfig, cfg: TrainConfig, size: int,
                     allow_changes: bool) -> list[dict]:
    """The run's change history for config.json once it continues from ck (trained as old) as cfg on size ranks;
    a InputError naming the keys this resume would change, unless allow_changes."""
    source = str(ck.path(".json"))
    old_size = ck.record.get("world_size")
    if type(old_size) is not int or old_size < 1:
        raise InputError(f"{source}: key 'world_size' must be a positive integer, got {old_size!r}")
    from trainer.model import describe as shape

    if shape(old) != shape(cfg):
        raise InputError(f"{ck.path('.params')}: cannot resume from it with {shape(cfg)}: its model has "
                         f"{shape(old)} (no resume changes the model's shape)")
    if cfg.epochs < ck.epoch:
        raise InputError(f"{out}: key 'epochs' {cfg.epochs} is fewer than the {ck.epoch} epochs its checkpoint "
                         f"{ck.stem.name} has done")
    new = resume_changes(old, old_size, cfg, size)
    if new and not allow_changes:
        raise InputError(f"{out}: resuming would change the training of epochs {ck.epoch + 1} on from the values "
                         f"epochs 1-{ck.epoch} ran with ({ck.stem.name}): "
                         + "; ".join(describe_change(c, cfg) for c in new)
                         + ". Resume with the run's own values, or pass --resume-with-changes to continue with "
                           "the new ones (config.json then records each change and its epoch)")
    return earlier_changes(out, ck.epoch) + [{"epoch": ck.epoch, **c} for c in new]


def earlier_changes(out: Path, before_epoch: int) -> list[dict]:
    """config.json's recorded changes that began before before_epoch (later ones are being redone)."""
    try:
        changes = rundir.read_run_config(out).get("changes", [])
    except InputError:
        return []
    if not isinstance(changes, list):
        return []
    return [c for c in changes if isinstance(c, dict) and type(c.get("epoch")) is int and c["epoch"] < before_epoch]


def load_checkpoint_params(net, stem: Path, cfg: TrainConfig, ctx) -> None:
    """The checkpoint's parameters into net, or a InputError naming the file."""
    import mxnet as mx

    from trainer.model import describe as shape

    try:
        net.load_parameters(str(stem.with_suffix(".params")), ctx=ctx)
    except (OSError, mx.base.MXNetError, AssertionError) as e:
        raise InputError(f"{stem}.params: cannot resume from it with {shape(cfg)}: {e}") from e


def read_average(net, cfg: TrainConfig, ck: rundir.Checkpoint):
    """The checkpoint's weight average (None when cfg.ema is 0, or when the checkpoint has none: a resume
    that turns ema on averages from the resumed weights)."""
    path = ck.path(EMA_SUFFIX)
    if not cfg.ema or path.name not in ck.record["files"]:
        return None
    ema = WeightAverage(net, cfg.ema)
    try:
        ema.load(path)
    except ValueError as e:
        raise InputError(f"{e}; resume with the run's own width, or start a new --out") from e
    return ema


def start_ema(net, cfg: TrainConfig, point: Resume):
    """The weight average (None when cfg.ema is 0): rank 0's resumed one, else one of the (broadcast) weights;
    identical on every rank."""
    from trainer.collectives import broadcast_in_place

    if not cfg.ema:
        return None
    ema = point.ema or WeightAverage(net, cfg.ema)
    broadcast_in_place({f"ema.{name}": a for name, a in ema.avg.items()}, root_rank=0)
    return ema


def share_optimizer_state(trainer, states: dict, point: Resume) -> None:
    """Rank 0's resumed optimizer state and counters, installed in every rank's trainer. states: each rank's
    fresh ones (fresh_optimizer_state), on rank 0 filled from the checkpoint, less the indices it has none for."""
    import mxnet as mx

    from trainer.collectives import broadcast_in_place

    indices = [i for i, p in enumerate(trainer._params) if p.grad_req != "null"]
    # per index its update count, -1 where rank 0's checkpoint has no state (the parameter was never updated)
    meta = mx.nd.array([point.num_update, *(point.counts.get(i, 0) if i in states else -1 for i in indices)],
                       dtype="float64")
    broadcast_in_place({"opt.meta": meta}, root_rank=0)
    num_update, *counts = (int(v) for v in meta.asnumpy())
    kept = {i: states[i] for i, n in zip(indices, counts, strict=True) if n >= 0}
    arrays, _ = rundir.flat_state(kept)
    broadcast_in_place({f"opt.{k}": a for k, a in arrays.items()}, root_rank=0)
    rundir.install_optimizer_state(trainer, kept, num_update,
                                   {i: n for i, n in zip(indices, counts, strict=True) if n >= 0})


def init_amp(mode: str):
    """mxnet.contrib.amp initialised for mode, or None for 'none'."""
    if mode == "none":
        return None
    from mxnet.contrib import amp

    amp.init(target_dtype=mode)
    return amp


def build(cfg: TrainConfig, classes: list[str], out: Path, phase: str, resume: bool, world: World,
          allow_changes: bool = False, train_images=None) -> Model:
    """Model (identical on every rank), optimizer, objective and the resume point. train_images: the
    training split, which a whitened stem is computed from (on rank 0)."""
    from trainer.collectives import broadcast_in_place
    from trainer.hvd_trainer import DenseGradTrainer, compressor
    from trainer.precision import resume_loss_scale

    amp = init_amp(cfg.amp)
    stem_images = train_images[:WHITEN_IMAGES] if world.rank == 0 and train_images is not None else None
    net = build_net(cfg, len(classes), world.ctx, stem_images)
    params = net.collect_params()
    lr = base_lr(cfg, world.size)
    trainer = DenseGradTrainer(params, *optimizer_spec(cfg, lr), compression=compressor(cfg.compression))
    if cfg.amp == "float16":
        amp.init_trainer(trainer)
    states = rundir.fresh_optimizer_state(trainer) if resume else None
    point = resume_point(out, phase, cfg, world, allow_changes, net, states)
    # hvd.broadcast_parameters, through plain-layout copies (see trainer.collectives)
    broadcast_in_place({f"param.{name}": p.data() for name, p in params.items()}, root_rank=0)
    if point.epoch:
        share_optimizer_state(trainer, states, point)
        resume_loss_scale(trainer, point.record, world.hvd)
    return Model(net, trainer, make_objective(len(classes), cfg.label_smoothing), amp, lr, point.epoch,
                 scale_loss=cfg.amp == "float16", ema=start_ema(net, cfg, point), changes=point.changes,
                 epochs=point.epochs)


def write_run_record(out: Path, cfg: TrainConfig, classes: list[str], phase: str, prepared: Path, size: int,
                     lr: float, threads: int, changes: list[dict] | None = None) -> None:
    """RUN/config.json: everything needed to reproduce and to predict with this run (rank 0 calls it); cfg is
    the config now, changes what a resume changed (train's values before each change's epoch were the old)."""
    record = RunRecord(train=cfg, classes=classes, phase=phase, prepared=str(prepared.resolve()),
                       world_size=size, global_batch=cfg.batch_size * size, lr=lr,
                       threads_per_rank=threads, versions=versions(), changes=list(changes or []))
    rundir.write_run_config(out, record.to_json())


# --- one step ----------------------------------------------------------------------------------------

def make_objective(n_classes: int, label_smoothing: float):
    """objective(logits, labels) -> per-image loss: softmax cross-entropy against the (smoothed) labels.

    With smoothing eps the target is 1 - eps + eps/k for the label and eps/k elsewhere.
    """
    from mxnet import gluon

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=label_smoothing == 0)

    def objective(logits, labels):
        return loss_fn(logits, smooth_targets(labels, n_classes, label_smoothing))

    return objective


def smooth_targets(labels, n_classes: int, eps: float):
    """The labels themselves (eps 0), else their smoothed one-hot rows."""
    if not eps:
        return labels
    import mxnet as mx

    return mx.nd.one_hot(labels, n_classes, on_value=1 - eps + eps / n_classes, off_value=eps / n_classes)


def train_step(model: Model, X, Y, batch_size: int):
    """Forward, backward (loss-scaled under float16 AMP) and one optimizer step; returns (logits, loss)."""
    from mxnet import autograd

    with autograd.record():
        out = model.net(X).astype("float32")
        loss = model.objective(out, Y)
    if model.scale_loss:
        with model.amp.scale_loss(loss, model.trainer) as scaled:
            autograd.backward(scaled)
    else:
        loss.backward()
    model.trainer.step(batch_size)
    if model.ema is not None:
        model.ema.update()
    return out, loss


# --- one epoch ---------------------------------------------------------------------------------------

def epoch_batches(split, cfg: TrainConfig, epoch: int, rank: int, size: int):
    """This rank's stream of (x, y) for the epoch, from the configured pipeline."""
    from trainer.pipeline import batched_stream, d2l_stream
    from trainer.presets import alternating_flips, train_transform

    shard = train_shard(len(split.images), cfg.batch_size, rank, size, cfg.seed, epoch)
    if cfg.pipeline == "d2l":
        import random

        import mxnet as mx

        # gluon's crop draws from Python's random, its flip from MXNet's generator
        random.seed(f"{cfg.seed}-{epoch}-{rank}")
        mx.random.seed(cfg.seed * 1000003 + epoch * 101 + rank)
        return d2l_stream(split.images, split.labels, shard)
    rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
    flips = alternating_flips(len(split.images), cfg.seed, epoch) if cfg.flip == "alternate" else None
    transform = train_transform(cfg.augment, cfg.pad, cfg.pad_mode, cfg.cutout, train_size(cfg, epoch), flips)
    return batched_stream(split.images, split.labels, shard, rng, transform=transform)


def progress_bar(world: World, steps: int, epoch: int):
    """A tqdm bar on rank 0 when stderr is a terminal, else None."""
    if world.rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)


def gather_epoch(world: World, loss_sum: float, correct: float, images: int, steps: int, seconds: float) -> dict:
    """Every rank's epoch totals combined: global loss, accuracy and speed, and each rank's step count; and this
    rank's seconds."""
    import mxnet as mx

    local = mx.nd.array([loss_sum, correct, images, steps, seconds], dtype="float64")
    totals = world.hvd.allgather(local.reshape((1, -1)), name="train_totals").asnumpy()
    n = totals[:, 2].sum()
    return {"train_loss": totals[:, 0].sum() / n, "train_acc": totals[:, 1].sum() / n,
            "images_per_sec": n / totals[:, 4].max(), "steps_per_rank": totals[:, 3].astype(int).tolist(),
            "pass_seconds": seconds}  # this rank's pass without validation, as epoch_seconds is this rank's epoch


def train_one_epoch(model: Model, data: Data, cfg: TrainConfig, epoch: int, world: World) -> dict:
    """One pass over this rank's shard; returns the global loss, accuracy and speed."""
    import mxnet as mx

    from trainer.prefetch import CopyRing, prefetched

    loss_sum = mx.nd.zeros(1, ctx=world.ctx)
    correct = mx.nd.zeros(1, ctx=world.ctx)
    in_flight: collections.deque = collections.deque()
    bar = progress_bar(world, data.steps, epoch)
    start = time.perf_counter()
    # batch k+1's copy to the device is queued before batch k's step (trainer.prefetch)
    batches = prefetched(epoch_batches(data.train, cfg, epoch, world.rank, world.size), CopyRing(world.ctx))
    for step, (X, Y) in enumerate(batches):
        model.trainer.set_learning_rate(lr_at(cfg, epoch + step / data.steps, world.size))
        out, loss = train_step(model, X, Y, cfg.batch_size)
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
    return gather_epoch(world, loss_sum.asscalar(), correct.asscalar(), data.steps * cfg.batch_size, data.steps,
                        seconds)


def sync_batchnorm_stats(net) -> None:
    """Average BatchNorm running statistics over ranks (each saw only its shard): one model everywhere."""
    from trainer.collectives import average_in_place

    average_in_place({f"aux.{name}": p.data() for name, p in net.collect_params().items() if p.grad_req == "null"})


def evaluate_valid(model: Model, data: Data, cfg: TrainConfig, world: World) -> dict | None:
    """Accuracy and loss on the valid split (tune), or None (final)."""
    if data.valid is None:
        return None
    from trainer.evaluate import evaluate

    with averaged(model.ema):  # the weight average, when on, is the model being validated
        return evaluate(model.net, data.valid.images, data.valid.labels, world.ctx, cfg.eval_batch_size, world.hvd,
                        crop=cfg.eval_crop, tta=cfg.tta)


def run_epoch(model: Model, data: Data, cfg: TrainConfig, phase: str, epoch: int, world: World) -> dict:
    """Train one epoch, agree on BatchNorm statistics, validate (when schedule.validates); the epoch's metrics row."""
    t0 = time.perf_counter()
    lr = lr_at(cfg, epoch, world.size)
    record = train_one_epoch(model, data, cfg, epoch, world)
    sync_batchnorm_stats(model.net)
    t1 = time.perf_counter()
    valid = evaluate_valid(model, data, cfg, world) if validates(cfg, epoch) else None
    return {"epoch": epoch, "phase": phase, "lr": lr, **record,
            "valid_acc": valid["acc"] if valid else None, "valid_loss": valid["loss"] if valid else None,
            **({"valid_acc_plain": valid["plain_acc"]} if valid and cfg.tta != "none" else {}),
            "valid_seconds": time.perf_counter() - t1, "epoch_seconds": time.perf_counter() - t0}


# --- recording ---------------------------------------------------------------------------------------

def save_epoch(out: Path, record: dict, history: list[dict], model: Model, cfg: TrainConfig, size: int) -> None:
    """Rank 0's record of a finished epoch: metrics.jsonl, curves.png and a checkpoint."""
    rundir.append_metrics(out, record)
    history.append(record)
    with rundir.writing(out / rundir.CURVES):
        curves.plot_curves(out, history)
    # the checkpoint carries the config its epochs ran with: a resume compares against it
    rundir.save_checkpoint(out, record["epoch"] + 1, model.net, model.trainer,
                           {"phase": record["phase"], "lr": record["lr"], "world_size": size,
                            "global_batch": cfg.batch_size * size, "train": dataclasses.asdict(cfg),
                            "amp_loss_scale": loss_scale_state(model.trainer)}, cfg.keep_checkpoints,
                           extra=checkpoint_files(model.ema))


def epoch_line(record: dict, epochs: int) -> str:
    """The progress line for a finished epoch."""
    valid = f" valid_acc {record['valid_acc']:.4f}" if record["valid_acc"] is not None else ""
    return (f"epoch {record['epoch'] + 1}/{epochs} lr {record['lr']:.4g} train_loss {record['train_loss']:.4f} "
            f"train_acc {record['train_acc']:.4f}{valid} {record['images_per_sec']:.0f} img/s "
            f"{record['epoch_seconds']:.1f}s")


def resolution_ratio(cfg: TrainConfig, n_classes: int, world: World, steps: int = 8) -> float:
    """How many low_res training steps' seconds a 32x32 one takes on this rank (to 3 decimals): the median ratio
    of `steps` pairs of forward-backward passes of noise, one at each size in turn (a machine that slows or speeds
    up weighs on both passes of a pair alike), after an untimed pair (a shape's first pass builds its kernels).
    Two copies of the model, one per size (a hybridized model replans its memory whenever its input's shape
    changes), leave the one being trained exactly as it was (build_net reseeds MXNet's generator as the model's
    own build did, leaving it where that build left it). ~9 s at width 16 on one core."""
    import mxnet as mx
    from mxnet import autograd

    from trainer.presets import downscale

    noise = np.random.default_rng(0).standard_normal((cfg.batch_size, 3, 32, 32)).astype(np.float32)
    sizes = (32, cfg.low_res)
    nets = {size: build_net(cfg, n_classes, world.ctx) for size in sizes}
    inputs = {size: mx.nd.array(downscale(noise, size), ctx=world.ctx) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(steps + 1):
        for size in sizes:
            start = time.perf_counter()
            with autograd.record():
                loss = nets[size](inputs[size]).astype("float32").sum()
            loss.backward()
            mx.nd.waitall()
            times[size].append(time.perf_counter() - start)
    return round(float(np.median(np.divide(times[32][1:], times[cfg.low_res][1:]))), 3)


def fit_to_budget(cfg: TrainConfig, first: dict, ratio: float, spent: float, world: World, record_run) -> TrainConfig:
    """cfg with the count of epochs rank 0 fits to its time_budget (trainer.budget): `spent` seconds gone, the first
    epoch's row `first`, a 32x32 training pass `ratio` times its pass; rank 0 records it and says so."""
    spent = round(spent, 3)
    extra_s = (ratio - 1) * first["pass_seconds"]
    epochs = int(broadcast_scalar(budget.fitted(cfg, first["epoch_seconds"], extra_s, spent, first["valid_seconds"]),
                                  "budget_epochs"))
    fitted = budget.with_epochs(cfg, epochs)
    if world.rank == 0:
        record_run(fitted)
        size = f"{cfg.low_res}x{cfg.low_res}"
        low = (f", {fitted.low_res_epochs} of them at {size} (a 32x32 epoch takes {extra_s:.3f} s more: its training "
               f"pass, {first['pass_seconds']:.3f} s at {size}, costed at {ratio:.3f} times, as a 32x32 step was "
               f"timed)") if cfg.low_res_epochs else ""
        world.log(f"time_budget {cfg.time_budget:g} s: {spent:.3f} s spent, the first epoch {first['epoch_seconds']:.1f} s,"
                  f" so {epochs} epochs{low}")
    return fitted


def check_same_model(net, world: World) -> None:
    """Every rank must end with the same parameters (crc32 compared across ranks)."""
    import mxnet as mx

    crcs = world.hvd.allgather(mx.nd.array([[param_crc(net)]], dtype="float64"), name="param_crc").asnumpy()
    crcs = [int(c) for c in crcs[:, 0]]
    world.log("param crc32 by rank: " + " ".join(f"{c:08x}" for c in crcs))
    if len(set(crcs)) != 1:
        raise RuntimeError(f"ranks ended with different parameters (crc32 by rank: {crcs})")


# --- the stage ---------------------------------------------------------------------------------------

def start_line(data: Data, cfg: TrainConfig, phase: str, model: Model, world: World, threads: int) -> str:
    """The run's opening progress line."""
    return (f"train: phase {phase}, {len(data.train.images)} images, world size {world.size} "
            f"({threads} threads/rank, {world.ctx}), per-rank batch {cfg.batch_size}, "
            f"global batch {cfg.batch_size * world.size}, lr {model.lr:g}, {data.steps} steps/epoch, "
            f"pipeline {cfg.pipeline}, amp {cfg.amp}")


def train(prepared: str | Path, out: str | Path, cfg: TrainConfig, *, phase: str = "tune", resume: bool = False,
          threads: int | None = None, verify: bool = False, allow_changes: bool = False) -> RunSummary:
    """Train cfg's model on the prepared dir's phase split into the run dir out; call it on every rank.

    Inputs are checked before anything is written to out; rank 0 alone writes. threads: the
    per-rank CPU thread count already set (None: set it now from cfg.threads). verify: re-hash the prepared
    files (rank 0) before any rank reads them. allow_changes: a resume may change training keys (recorded in
    config.json's changes); without it such a resume is a InputError naming them.
    """
    prepared, out = Path(prepared), Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a directory; choose a run directory path")
    threads = set_cpu_threads(cfg.threads) if threads is None else threads
    check_recipe(cfg)
    world = init_world()
    problem = device_problem(cfg.amp, world.ctx)
    if problem:
        raise InputError(problem)
    verify_prepared(world.hvd, prepared, verify)
    data = load_data(prepared, phase, cfg, world.size)
    lock = check_out_dir(out, resume, world)  # rank 0 holds RUN's writer lock until train returns
    try:
        return fit(prepared, out, cfg, phase, resume, threads, data, world, allow_changes)
    finally:
        lock.release()


def fit(prepared: Path, out: Path, cfg: TrainConfig, phase: str, resume: bool, threads: int, data: Data,
        world: World, allow_changes: bool = False) -> RunSummary:
    """The checked part of train: build (or resume) the model, run the epochs, export; rank 0 writes."""
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        rundir.start(out)
    model = build(cfg, data.classes, out, phase, resume, world, allow_changes, data.train.images)
    if cfg.time_budget and model.start_epoch:
        cfg = budget.with_epochs(cfg, model.epochs)

    def record_run(run_cfg: TrainConfig) -> None:
        write_run_record(out, run_cfg, data.classes, phase, prepared, world.size, model.lr, threads, model.changes)

    if world.rank == 0:
        record_run(cfg)
    world.log(start_line(data, cfg, phase, model, world, threads))
    history = rundir.truncate_metrics(out, model.start_epoch) if world.rank == 0 else []
    if model.start_epoch:
        world.log(f"resuming at epoch {model.start_epoch + 1} from {out / rundir.CHECKPOINT_DIR}")
    epoch = model.start_epoch
    clock = time.perf_counter()  # the budget's seconds start here: the step timing counts
    timed = cfg.time_budget and cfg.low_res_epochs and not epoch
    ratio = resolution_ratio(cfg, len(data.classes), world) if timed else 1.0
    while epoch < cfg.epochs:
        record = run_epoch(model, data, cfg, phase, epoch, world)
        if epoch == 0 and cfg.time_budget:
            cfg = fit_to_budget(cfg, record, ratio, time.perf_counter() - clock, world, record_run)
        if world.rank == 0:
            save_epoch(out, record, history, model, cfg, world.size)
            world.log(epoch_line(record, cfg.epochs))
        epoch += 1
    if model.ema is not None:
        model.ema.apply()  # the final model is the weight average
    check_same_model(model.net, world)
    if world.rank == 0:
        write_final_model(out, model.net, data.classes, cfg.eval_crop)
        world.log(f"wrote {out / rundir.FINAL_PARAMS} and {out / rundir.MODEL_SYMBOL}")
        from trainer.onnx_export import export_final

        world.log(export_final(out))  # model.onnx beside the MXNet export when onnx is installed
    return RunSummary(str(out), phase, cfg.epochs, model.start_epoch, world.size, str(out / rundir.FINAL_PARAMS),
                      history)
