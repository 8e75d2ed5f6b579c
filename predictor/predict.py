"""Sharded inference over the test split; rank 0 gathers (id, prediction) pairs and writes submission.csv.

Each rank reads only its contiguous rows of the memory-mapped test split, predicts them in
fixed-shape batches and keeps compact int arrays. `hvd.allgather` brings the pairs to rank 0,
which orders them by numeric id (ids travel with their predictions, so the d2l chapter's
string-sorted-ids mix-up cannot happen), checks every test id is there exactly once, and
streams the CSV to a temporary sibling that is renamed into place.

    python -m predictor.predict --prepared PREP --model RUN [--out RUN/submission.csv]
                              [--batch-size 512] [--tta flip|flip-translate] [--precision int8] [--engine onnxruntime]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from contracts.errors import InputError, run_command
from contracts.files import check_output, remove_stale_temps
from contracts.schema import Parser, add_flags, resolve
from predictor.config import PredictConfig
from trainer.device import set_cpu_threads
from trainer.inference import context_budget, forward_rows, logit_batches
from trainer.sharding import eval_slice


def load_model(model_dir: str | Path, ctx, precision: str = "float32", calib_images: np.ndarray | None = None):
    """(hybridized net, class names, width, eval crop) from a trainer run dir: its final model, else its newest checkpoint.

    The eval crop (TrainConfig.eval_crop) is the view the model was validated with; predict uses the same.
    """
    import mxnet as mx

    from trainer import model
    from trainer.config import read_run_record
    from trainer.rundir import find_model_params

    model_dir = Path(model_dir)
    try:
        record = read_run_record(model_dir)
        params = find_model_params(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: not a usable trainer run dir: {e}") from e
    classes, width, crop = record.classes, record.train.width, record.train.eval_crop
    net = model.from_config(record.train, len(classes))
    try:
        net.load_parameters(str(params), ctx=ctx)
    except (mx.MXNetError, AssertionError, ValueError) as e:
        raise InputError(f"{params}: cannot load into ResNet-18 ({model.describe(record.train)}, "
                         f"{len(classes)} classes): {e}") from e
    if precision == "int8":
        net = quantize_int8(net, calib_images, ctx, crop)
    # not static_alloc: it keeps every intermediate buffer (2.6 GB at width 64, batch 512)
    net.hybridize()
    return net, list(classes), width, crop


def quantize_int8(net, calib_images: np.ndarray | None, ctx, crop: int = 0):
    """MKLDNN int8 version of net (channel-wise, 'smart' mode), calibrated (min/max) on training images.

    Opt-in (--precision int8): on the benchmark's gate it matched float32 accuracy on 40,000
    held-out CIFAR-10 images at about 3x the speed (benchmarks/bench_predict.py).
    """
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    from trainer.presets import eval_transform

    if calib_images is None or len(calib_images) == 0:
        raise InputError("int8 precision needs calibration images (the prepared train split is empty)")
    if ctx.device_type != "cpu":
        raise InputError("int8 precision is for CPU (MKLDNN) inference only")
    net.hybridize()
    data = mx.nd.array(eval_transform(np.asarray(calib_images), crop), ctx=ctx)
    calib = mx.io.NDArrayIter(data, batch_size=min(64, len(data)))
    return quantize_net_v2(net, quantized_dtype="auto", quantize_mode="smart", quantize_granularity="channel-wise",
                           calib_data=calib, calib_mode="naive", num_calib_examples=len(data), ctx=ctx)


def predict_rows(net, images: np.ndarray, ctx, batch_size: int, tta: str = "none", progress=None,
                 crop: int = 0) -> np.ndarray:
    """Class index (int32) for every row of images (uint8 N x 32 x 32 x 3), in row order."""
    preds = np.empty(len(images), dtype=np.int32)
    for start, stop, logits in logit_batches(net, images, ctx, batch_size, crop, tta):
        preds[start:stop] = logits.argmax(axis=1).asnumpy().astype(np.int32)
        if progress is not None:
            progress.update(stop - start)
    return preds


def gather_pairs(hvd, ids: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """All ranks' (id, prediction) rows as one int64 (N, 2) array (shards may differ in size or be empty)."""
    import mxnet as mx

    pairs = np.stack([ids.astype(np.int64), preds.astype(np.int64)], axis=1)
    if hvd.size() == 1:
        return pairs
    return hvd.allgather(mx.nd.array(pairs, dtype="int64"), name="predict.pairs").asnumpy()


def order_and_check(pairs: np.ndarray, expected_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending numerically, their predictions); raises unless each expected id is there exactly once."""
    order = np.argsort(pairs[:, 0], kind="stable")
    ids, preds = pairs[order, 0], pairs[order, 1]
    if len(ids) != len(expected_ids) or not np.array_equal(ids, np.sort(expected_ids)):
        raise RuntimeError(f"gathered {len(ids)} predictions, expected {len(expected_ids)} distinct test ids")
    if len(ids) > 1 and not np.all(np.diff(ids) > 0):
        raise RuntimeError("duplicate test ids in the gathered predictions")
    return ids, preds


def write_submission(path: str | Path, ids: np.ndarray, preds: np.ndarray, classes: list[str]) -> Path:
    """submission.csv through the id,label contract (contracts.labels): written beside, then renamed to path."""
    from contracts.labels import write_table

    return write_table(path, ids, np.array(classes, dtype=object)[preds])


def _check_inputs(prepared: Path, model_dir: Path, out: Path) -> None:
    """Fail early, on every rank alike, before any collective: missing dirs are input errors."""
    if not prepared.is_dir():
        raise InputError(f"{prepared}: prepared data dir not found (run `cifar10-hvd prepare` first)")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model run dir not found")
    if out.is_dir():
        raise InputError(f"{out}: --out is a directory; give the submission's file path, e.g. {out / 'submission.csv'}")
    if not out.parent.is_dir():
        raise InputError(f"{out}: output folder {out.parent} does not exist")
    check_output(out, "--out")


@dataclass
class SubmissionSummary:
    """What `predict` returns on every rank; also readable as a mapping (res["count"])."""

    path: str
    count: int
    seconds: float
    images_per_sec: float
    ranks: int
    shard: list[int]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def figures(self) -> dict:
        """The launcher's summary.json figures for the predict stage (no file read)."""
        return {"images": self.count, "submission": self.path}


def open_test_split(prepared: Path, precision: str):
    """(test split, manifest classes, int8 calibration images or None) from the prepared dir."""
    import data_prep
    from trainer.onnx_int8 import calibration_images

    try:
        manifest = data_prep.read_manifest(prepared)
        split = data_prep.open_split(prepared, "test", manifest)
        calib = calibration_images(prepared, manifest) if precision == "int8" else None
    except (InputError, OSError, ValueError, KeyError) as e:
        raise InputError(f"{prepared}: cannot open the prepared test split: {e}") from e
    return split, list(manifest["classes"]), calib


def infer_shard(net, images: np.ndarray, shard: slice, ctx, batch_size: int, width: int, tta: str, crop: int,
                bar: str | None) -> np.ndarray:
    """Predictions for rows shard of images, under a progress bar titled bar when given and stderr is a terminal."""
    rows = forward_rows(batch_size, width, context_budget(ctx))
    with progress_bar(bar, shard.stop - shard.start) as progress:
        return predict_rows(net, images[shard], ctx, rows, tta, progress, crop)


@contextlib.contextmanager
def progress_bar(bar: str | None, total: int):
    """A tqdm bar titled bar on a terminal's stderr, else None."""
    if not (bar and sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm

    progress = tqdm(total=total, unit="img", desc=bar, file=sys.stderr)
    try:
        yield progress
    finally:
        progress.close()


def mxnet_engine(model_dir: Path, cfg: PredictConfig, ctx, calib):
    """(infer(images, shard, bar) -> predictions, class names) on MXNet, from the run's model (load_model)."""
    net, classes, width, crop = load_model(model_dir, ctx, cfg.precision, calib)

    def infer(images: np.ndarray, shard: slice, bar: str | None) -> np.ndarray:
        return infer_shard(net, images, shard, ctx, cfg.batch_size, width, cfg.tta, crop, bar)

    return infer, classes


def onnx_engine(model_dir: Path, cfg: PredictConfig, calib, threads: int, verbose: bool):
    """(infer(images, shard, bar) -> predictions, class names) on onnxruntime, from RUN/model.onnx."""
    from predictor import onnx_predict
    from trainer.config import read_run_record
    from trainer.inference import ACTIVATION_BUDGET, forward_rows

    session, classes = onnx_predict.load(model_dir, cfg.precision, calib, threads,
                                         log=(lambda line: print(line, flush=True)) if verbose else None)
    train = read_run_record(model_dir).train
    if cfg.tta == "flip-translate" and train.eval_crop:
        raise InputError(f"predict.tta flip-translate with the onnxruntime engine: {model_dir} was validated at "
                         f"train.eval_crop {train.eval_crop}, a view this engine cannot move (use --engine mxnet)")
    rows = forward_rows(cfg.batch_size, train.width, ACTIVATION_BUDGET)

    def infer(images: np.ndarray, shard: slice, bar: str | None) -> np.ndarray:
        with progress_bar(bar, shard.stop - shard.start) as progress:
            return onnx_predict.predict_rows(session, images[shard], rows, cfg.tta, progress)

    return infer, classes


def write_on_rank0(hvd, pairs: np.ndarray, expected_ids: np.ndarray, out: Path, classes: list[str]) -> None:
    """Rank 0 orders, checks and writes the pairs; every rank learns whether it worked (RuntimeError if not)."""
    failure = ""
    if hvd.rank() == 0:
        try:
            ids, ordered = order_and_check(pairs, expected_ids)
            write_submission(out, ids, ordered, classes)
        except (OSError, RuntimeError) as e:
            failure = f"{out}: {e}"
    if hvd.size() > 1:
        import mxnet as mx

        from trainer.collectives import broadcast

        # rank 0's write outcome, so no rank reports success for a file that was not written
        ok = broadcast(mx.nd.array([0 if failure else 1], dtype="int32"), 0, "predict.ok")
        if int(ok.asnumpy()[0]) == 0 and not failure:
            failure = f"{out}: rank 0 failed to write the submission"
    if failure:
        raise RuntimeError(failure)


def predict(prepared: str | Path, model_dir: str | Path, out: str | Path | None, cfg: PredictConfig, *,
            quiet: bool = False) -> SubmissionSummary:
    """Predict the prepared test split with the run's model; rank 0 writes out (None: RUN/submission.csv).

    Call it on every rank, with a PredictConfig the schema has validated (contracts.schema.resolve).
    images_per_sec counts all ranks' images over the wall time from first batch to file written.
    cfg.precision: float32 or int8 (the schema's choices); bfloat16 only for the benchmark's gate (slower
    on CPU here). cfg.engine: mxnet, or onnxruntime (RUN/model.onnx on the CPU; predictor.onnx_predict).
    quiet: no progress bar or closing line.
    """
    cpu_threads = set_cpu_threads(cfg.threads)
    from trainer.cuda_arch import gpu_problem
    from trainer.device import context, init_horovod

    prepared, model_dir = Path(prepared), Path(model_dir)
    out = Path(out) if out is not None else model_dir / "submission.csv"
    _check_inputs(prepared, model_dir, out)
    hvd = init_horovod("predict")
    if hvd.rank() == 0:  # a rank 0 killed mid-write left its temporary beside out
        remove_stale_temps(out.parent, of=out.name)
    if cfg.engine == "onnxruntime":
        split, manifest_classes, calib = open_test_split(prepared, cfg.precision)
        infer, classes = onnx_engine(model_dir, cfg, calib, cpu_threads, hvd.rank() == 0 and not quiet)
    else:
        ctx = context(hvd)
        problem = gpu_problem(ctx)
        if problem:
            raise InputError(problem)
        split, manifest_classes, calib = open_test_split(prepared, cfg.precision)
        infer, classes = mxnet_engine(model_dir, cfg, ctx, calib)
    if classes != manifest_classes:
        raise InputError(f"{model_dir}: model classes {classes} differ from {prepared} manifest classes {manifest_classes}")
    n = len(split.ids)
    shard = eval_slice(n, hvd.rank(), hvd.size())  # contiguous; sizes differ by at most one, some may be empty
    t0 = time.perf_counter()
    bar = f"predict rank 0/{hvd.size()}" if hvd.rank() == 0 and not quiet else None
    preds = infer(split.images, shard, bar)
    pairs = gather_pairs(hvd, np.asarray(split.ids[shard]), preds)
    write_on_rank0(hvd, pairs, np.asarray(split.ids), out, classes)
    seconds = time.perf_counter() - t0
    result = SubmissionSummary(str(out), int(n), round(seconds, 3), round(n / seconds, 1) if seconds > 0 else 0.0,
                               hvd.size(), [int(shard.start), int(shard.stop)])
    if hvd.rank() == 0 and not quiet:
        how = cfg.precision if cfg.engine == "mxnet" else f"{cfg.precision}, {cfg.engine}"
        print(f"predict: {n} images on {hvd.size()} rank(s) ({how}) in {seconds:.1f}s, "
              f"{result.images_per_sec:.0f} images/s, wrote {out}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The predict command line: paths here, inference options (threads included) from PredictConfig."""
    p = Parser(prog="cifar10-hvd predict", description=__doc__.split("\n")[0])
    p.add_argument("--prepared", required=True, help="prepared data dir (cifar10-hvd prepare --out)")
    p.add_argument("--model", required=True, help="trainer run dir (its final model, else its newest checkpoint)")
    p.add_argument("--out", default=None, help="submission path (default: MODEL/submission.csv)")
    p.add_argument("--config", default=None, help="YAML file whose predict: section sets the options below")
    add_flags(p, PredictConfig)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(PredictConfig, args, args.config, "predict")
    predict(args.prepared, args.model, args.out, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 for input errors, 1 for other failures (rank named)."""
    return run_command("predict", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
