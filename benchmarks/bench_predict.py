"""Benchmark: sharded `predictor.predict` (np 1 and np 2, MXNet and onnxruntime) vs the seed's test loop, and the int8/bf16 gate.

For each width: images/s and peak memory (VmHWM) per rank of `python -m predictor.predict`
alone and under `horovodrun -np 2 --gloo`, against the d2l seed's loop (ImageFolderDataset
over the test PNG folder + transform_first(ToTensor, Normalize) + DataLoader(128) +
net(X).argmax, one process), with the same weights. Every submission is checked: ids
1..N each once, ascending. The gate trains a small model briefly on the prepared training
images and compares accuracy at float32, int8 (MKLDNN, calibrated on training images) and
bfloat16 on the valid split and on a larger held-out set (the CIFAR-10 training images the
generated set left out, never trained on): a reduced precision is worth offering only
within 0.3 points. Each precision runs on each engine (--engines: MXNet, and onnxruntime on the
run's model.onnx, int8 by its static quantization) on the same model and images; every submission's
agreement with MXNet float32 on the same ranks is in the table.

    .venv/bin/python benchmarks/bench_predict.py                      # 300,000 test images
    .venv/bin/python benchmarks/bench_predict.py --test 20000 --widths 16 --seed-limit 5000
    .venv/bin/python benchmarks/bench_predict.py --engines mxnet   # without the onnx extra

Data (made once, reused): WORKDIR/kaggle-N from /work/shared/data/make_kaggle_cifar10.py,
WORKDIR/prep-N from `cifar10-hvd prepare`. Results: printed table and WORKDIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from contracts.labels import CIFAR10_CLASSES as CLASSES
from data_prep.store import MANIFEST
from launcher import run as launcher_run
from trainer.presets import MEAN, STD
from trainer.rundir import CHECKPOINT_DIR, MODEL_SYMBOL

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_KAGGLE = ROOT.parent / "shared" / "data" / "make_kaggle_cifar10.py"


def child_env() -> dict[str, str]:
    """The launcher's child environment, with threads left to the tool (cores / local ranks)."""
    env = launcher_run.child_env(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    return env


def sh(cmd: list[str], timeout: float = 7200) -> str:
    """Run cmd, return stdout; raise with its output on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench_lines(stdout: str) -> list[dict]:
    """The BENCH {...} records workers print (horovodrun prefixes each line with [rank]<stdout>:)."""
    return [json.loads(line.split("BENCH ", 1)[1]) for line in stdout.splitlines() if "BENCH {" in line]


def ensure_data(workdir: Path, n_test: int, n_train: int, name: str = "") -> tuple[Path, Path]:
    """(Kaggle-layout source, prepared dir) WORKDIR/kaggle-NAME and prep-NAME (NAME: n_test); made once."""
    name = name or str(n_test)
    src, prep = workdir / f"kaggle-{name}", workdir / f"prep-{name}"
    if not src.exists():
        print(f"[bench] writing {src} ({n_train} train, {n_test} test PNGs)", flush=True)
        sh([sys.executable, str(MAKE_KAGGLE), "--out", str(src), "--train", str(n_train), "--test", str(n_test)])
    if not (prep / MANIFEST).exists():
        print(f"[bench] preparing {prep}", flush=True)
        sh([str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(prep)])
    return src, prep


def ensure_model(workdir: Path, prep: Path, width: int, epochs: int) -> Path:
    """A run dir at width: trained briefly (tune phase) when epochs > 0, else freshly initialized weights;
    with its MXNet export and model.onnx (when onnx is installed) for the onnxruntime engine."""
    run = workdir / f"run-w{width}-e{epochs}"
    if not (run / "model.onnx").exists():
        run = _ensure_weights(run, prep, width, epochs)
        from trainer.onnx_export import available

        if available() and (run / MODEL_SYMBOL).exists():
            sh([str(BIN / "cifar10-hvd"), "export", "--model", str(run)])
    return run


def _ensure_weights(run: Path, prep: Path, width: int, epochs: int) -> Path:
    """run, trained or initialized unless it already holds weights (an untrained one also its MXNet export)."""
    if (run / MODEL_SYMBOL).exists() or (epochs and (run / CHECKPOINT_DIR).is_dir()):
        return run
    if epochs:
        print(f"[bench] training width {width} for {epochs} epochs on {prep}", flush=True)
        sh([str(BIN / "cifar10-hvd"), "train", "--prepared", str(prep), "--out", str(run), "--phase", "tune",
            "--width", str(width), "--epochs", str(epochs), "--batch-size", "128", "--lr-period", str(max(1, epochs - 1))])
    else:
        sh([sys.executable, __file__, "--worker", "init", "--model", str(run), "--width", str(width)])
    return run


def seed_folder(workdir: Path, src: Path, n_test: int) -> Path:
    """The seed's train_valid_test/test/unknown folder (symlinks to the test PNGs), made once."""
    root = workdir / f"seed-test-{n_test}"
    folder = root / "unknown"
    if not (root / ".done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(src / "test"):
            link = folder / name
            if not link.exists():
                link.symlink_to(src / "test" / name)
        (root / ".done").write_text("")
    return root


def check_submission(path: Path, n: int) -> None:
    """Every id 1..n once, ascending, labels in the classes; streamed."""
    expected = 1
    with open(path) as f:
        assert f.readline() == "id,label\n", path
        for line in f:
            id_, label = line.rstrip("\n").split(",")
            if int(id_) != expected or label not in CLASSES:
                raise AssertionError(f"{path}: line {expected + 1} is {line!r}")
            expected += 1
    if expected - 1 != n:
        raise AssertionError(f"{path}: {expected - 1} rows, expected {n}")


# ---- workers: run in their own processes so threads and peak memory are their own ----

def peak_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def worker_init(args) -> None:
    """Write an untrained run dir with its MXNet export (speed does not depend on the weights)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import mxnet as mx

    from contracts.files import atomic_write_text
    from trainer.config import RunRecord, TrainConfig
    from trainer.export import write_final_model
    from trainer.model import resnet18
    from trainer.rundir import RUN_CONFIG

    run = Path(args.model)
    run.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    net = resnet18(10, width=args.width)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    atomic_write_text(run / RUN_CONFIG, RunRecord(train=TrainConfig(width=args.width), classes=list(CLASSES)).to_json())
    write_final_model(run, net, list(CLASSES), 0)


def worker_predict(args) -> None:
    """predictor.predict.predict as the launcher calls it, then this rank's figures."""
    from predictor.config import PredictConfig
    from predictor.predict import predict

    cfg = PredictConfig(batch_size=args.batch_size, tta=args.tta, precision=args.precision, engine=args.engine)
    res = predict(args.prepared, args.model, args.out, cfg, quiet=True)
    print("BENCH " + json.dumps({**res.__dict__, "rank_peak_mb": peak_mb(), "threads": int(os.environ["OMP_NUM_THREADS"])}), flush=True)


def worker_seed(args) -> None:
    """The seed's test loop (kaggle_cifar10.md), stopped after --seed-limit images."""
    from trainer.device import set_cpu_threads

    threads = set_cpu_threads(0)
    import mxnet as mx
    from mxnet import gluon

    from trainer.model import resnet18
    from trainer.rundir import find_model_params

    ctx = mx.cpu()
    net = resnet18(10, width=args.width)
    net.load_parameters(str(find_model_params(args.model)), ctx=ctx)
    net.hybridize()
    transform_test = gluon.data.vision.transforms.Compose([
        gluon.data.vision.transforms.ToTensor(), gluon.data.vision.transforms.Normalize(MEAN.tolist(), STD.tolist())])
    t_list = time.perf_counter()
    test_ds = gluon.data.vision.ImageFolderDataset(args.seed_folder)
    list_s = time.perf_counter() - t_list
    test_iter = gluon.data.DataLoader(test_ds.transform_first(transform_test), 128, shuffle=False, last_batch="keep")
    preds: list = []
    t0 = time.perf_counter()
    for X, _ in test_iter:
        y_hat = net(X.as_in_context(ctx))
        preds.extend(y_hat.argmax(axis=1).astype(int).asnumpy())
        if len(preds) >= args.seed_limit:
            break
    seconds = time.perf_counter() - t0
    print("BENCH " + json.dumps({"count": len(preds), "seconds": round(seconds, 3), "listing_seconds": round(list_s, 2),
                                 "images_per_sec": round(len(preds) / seconds, 1), "rank_peak_mb": peak_mb(),
                                 "threads": threads}), flush=True)


def to_bfloat16(net, ctx):
    """The float32 model predict loads, converted to bfloat16 (a gate candidate only; predict does not offer it)."""
    import mxnet as mx
    from mxnet.contrib import amp

    net(mx.nd.zeros((1, 3, 32, 32), ctx=ctx))  # conversion works on the traced graph
    net = amp.convert_hybrid_block(net, target_dtype="bfloat16", ctx=ctx)
    net.hybridize()
    return net


def worker_gate(args) -> None:
    """Valid accuracy and agreement with float32 on test rows, for each precision, same weights."""
    from trainer.device import set_cpu_threads

    set_cpu_threads(0)
    import mxnet as mx
    import numpy as np

    import data_prep
    from predictor.predict import forward_rows, load_model, predict_rows

    ctx = mx.cpu()
    valid = data_prep.open_split(args.prepared, "valid")
    holdout_images = holdout_labels = None
    if args.holdout:
        seen = int(data_prep.open_split(args.prepared, "train_valid").ids.max())
        pool = data_prep.open_split(args.holdout, "train_valid")
        unseen = np.nonzero(pool.ids > seen)[0]
        holdout_images, holdout_labels = np.asarray(pool.images)[unseen], pool.labels[unseen]
    test = data_prep.open_split(args.prepared, "test")
    calib = np.asarray(data_prep.open_split(args.prepared, "train").images[:512])
    test_rows = test.images[: args.gate_test_rows]
    out, ref = {}, None
    for precision in ("float32", "int8", "bfloat16"):
        net, _, width, _ = load_model(args.model, ctx, "float32" if precision == "bfloat16" else precision, calib)
        if precision == "bfloat16":
            net = to_bfloat16(net, ctx)
        rows = forward_rows(512, width)
        predict_rows(net, test_rows[:rows], ctx, rows)  # warm-up: bind the graph
        acc = float((predict_rows(net, valid.images, ctx, rows) == valid.labels).mean())
        t0 = time.perf_counter()
        p = predict_rows(net, test_rows, ctx, rows)
        rate = len(test_rows) / (time.perf_counter() - t0)
        ref = p if ref is None else ref
        out[precision] = {"valid_acc": round(acc, 4), "valid_n": len(valid.labels), "images_per_sec_1proc": round(rate, 1),
                          "test_agreement_with_float32": round(float((p == ref).mean()), 4)}
        if holdout_images is not None:
            hp = predict_rows(net, holdout_images, ctx, rows)
            out[precision].update(holdout_acc=round(float((hp == holdout_labels).mean()), 5), holdout_n=len(holdout_labels))
    print("BENCH " + json.dumps(out), flush=True)


# ---- orchestration ----

def labels(path: Path) -> list[str]:
    """A submission's label column, in id order (check_submission has checked the ids)."""
    with open(path) as f:
        next(f)
        return [line.rstrip("\n").split(",", 1)[1] for line in f]


def agreement(path: Path, reference: Path) -> float:
    """The share of rows whose labels in two submissions of the same images agree."""
    a, b = labels(path), labels(reference)
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a)), 5)


def run_predict(prep: Path, run: Path, out: Path, ranks: int, args, precision: str, engine: str = "mxnet") -> dict:
    """One predict run on `ranks` ranks: throughput, every rank's peak memory, the output checked."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", "predict", "--prepared", str(prep), "--model", str(run), "--out", str(out),
           "--batch-size", str(args.batch_size), "--precision", precision, "--engine", engine]
    if ranks > 1:
        cmd = launcher_run.horovodrun_argv(ranks, cmd)
    t0 = time.perf_counter()
    recs = bench_lines(sh(cmd))
    wall = time.perf_counter() - t0
    assert len(recs) == ranks, recs
    n = recs[0]["count"]
    check_submission(out, n)
    return {"ranks": ranks, "engine": engine, "precision": precision, "count": n, "images_per_sec": recs[0]["images_per_sec"],
            "seconds": recs[0]["seconds"], "process_wall_seconds": round(wall, 1),
            "peak_mb_per_rank": [r["rank_peak_mb"] for r in recs], "threads_per_rank": recs[0]["threads"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--test", type=int, default=300000, help="test images (default 300000, the competition's)")
    p.add_argument("--train", type=int, default=10000, help="training images in the generated set (gate and calibration)")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--test-large", type=int, default=None,
                   help="test images for widths above 16 (a width-64 pass over 300,000 takes long on a CPU box)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--precisions", nargs="+", default=["float32", "int8"], choices=["float32", "int8"],
                   help="precisions timed at full size (the gate also judges bfloat16, on one process)")
    p.add_argument("--engines", nargs="+", default=["mxnet", "onnxruntime"], choices=["mxnet", "onnxruntime"],
                   help="predict engines timed side by side (onnxruntime needs the onnx extra)")
    p.add_argument("--seed-limit", type=int, default=20000,
                   help="images the seed's loop is timed on (its rate is steady; 0 = skip it)")
    p.add_argument("--seed-limit-large", type=int, default=4000, help="the same for widths above 16")
    p.add_argument("--gate-epochs", type=int, default=4, help="epochs of the model the precision gate is judged on (0 = no gate)")
    p.add_argument("--gate-test-rows", type=int, default=10000)
    p.add_argument("--gate-holdout", type=int, default=40000,
                   help="held-out real CIFAR-10 images for the gate (train + this <= 50000; 0 = valid split only)")
    p.add_argument("--workdir", default="/tmp/bench_predict")
    p.add_argument("--results", default=None, help="results JSON (default: WORKDIR/results.json)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["init", "predict", "seed", "gate"], help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tta", default="none", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="mxnet", help=argparse.SUPPRESS)
    p.add_argument("--seed-folder", help=argparse.SUPPRESS)
    p.add_argument("--holdout", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        {"init": worker_init, "predict": worker_predict, "seed": worker_seed, "gate": worker_gate}[args.worker](args)
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else workdir / "results.json"
    results: dict = {"args": {k: v for k, v in vars(args).items() if v is not None}, "host_cpus": os.cpu_count(), "widths": {}}
    src, prep = ensure_data(workdir, args.test, args.train)
    if args.gate_epochs:
        gate_run = ensure_model(workdir, prep, 16, args.gate_epochs)
        cmd = [sys.executable, __file__, "--worker", "gate", "--prepared", str(prep), "--model", str(gate_run),
               "--gate-test-rows", str(args.gate_test_rows)]
        if args.gate_holdout:
            # the same fixed permutation: the first --train ids are the gate model's images, the rest unseen
            total = args.train + args.gate_holdout
            _, hprep = ensure_data(workdir, 10, total, name=f"holdout-{total}")
            cmd += ["--holdout", str(hprep)]
        gate = bench_lines(sh(cmd))[0]
        results["gate"] = gate
        print(f"[bench] precision gate (width 16, {args.gate_epochs} epochs): {json.dumps(gate)}", flush=True)
    for width in args.widths:
        n = args.test_large if (args.test_large and width > 16) else args.test
        wsrc, wprep = ensure_data(workdir, n, args.train) if n != args.test else (src, prep)
        run = ensure_model(workdir, wprep, width, args.gate_epochs if width == 16 and args.gate_epochs else 0)
        rows = []
        limit = args.seed_limit if width <= 16 else args.seed_limit_large
        folder = seed_folder(workdir, wsrc, n) if limit else None
        seed = {"count": 0, "images_per_sec": float("nan"), "rank_peak_mb": float("nan")}
        if limit:
            print(f"[bench] width {width}: seed loop on up to {limit} of {n} images", flush=True)
            seed = bench_lines(sh([sys.executable, __file__, "--worker", "seed", "--model", str(run), "--width", str(width),
                                   "--seed-folder", str(folder), "--seed-limit", str(limit)]))[0]
        for engine in args.engines:
            for precision in args.precisions:
                for ranks in args.ranks:
                    print(f"[bench] width {width}: predict {engine} {precision} on {ranks} rank(s), {n} images", flush=True)
                    sub = workdir / f"sub-w{width}-{engine}-{precision}-np{ranks}.csv"
                    row = run_predict(wprep, run, sub, ranks, args, precision, engine)
                    row["speedup_vs_seed"] = round(row["images_per_sec"] / seed["images_per_sec"], 2)
                    reference = workdir / f"sub-w{width}-mxnet-float32-np{ranks}.csv"
                    row["agreement_with_mxnet_float32"] = agreement(sub, reference) if reference.exists() else None
                    rows.append(row)
        results["widths"][str(width)] = {"test_images": n, "seed": seed, "predict": rows}
        results_path.write_text(json.dumps(results, indent=2))

    print("\n| width | N | run | images/s | x seed | peak MB per rank | agrees with mxnet float32 |\n|---|---|---|---|---|---|---|")
    for width, r in results["widths"].items():
        s = r["seed"]
        print(f"| {width} | {r['test_images']} | seed loop ({s['count']} imgs, 1 proc) | {s['images_per_sec']:.0f} | 1.00 | {s['rank_peak_mb']:.0f} | |")
        for row in r["predict"]:
            agree = row.get("agreement_with_mxnet_float32")
            print(f"| {width} | {row['count']} | predict {row.get('engine', 'mxnet')} {row['precision']} np{row['ranks']} | "
                  f"{row['images_per_sec']:.0f} | {row['speedup_vs_seed']:.2f} | "
                  f"{', '.join(f'{m:.0f}' for m in row['peak_mb_per_rank'])} | {'' if agree is None else f'{agree:.4%}'} |")
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
