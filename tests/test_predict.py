"""predictor.predict: ids 1..N once and ascending, each paired with its own image's prediction,
byte-identical under 1 and 2 real Horovod ranks, uneven and tiny shards, TTA, input errors.

The models here are untrained ResNet-18s (width 4) whose last layer is re-centred on demo
images so their predictions vary from image to image: a constant predictor could not
reveal ids paired with the wrong images (the d2l chapter's string-sorted-ids trap).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import horovodrun, run_cli

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before mxnet is first imported in this process

import data_prep  # noqa: E402
from launcher import demo_data  # noqa: E402
from predictor.config import PredictConfig  # noqa: E402

CLASSES = list(demo_data.CLASSES)
WIDTH = 4


def make_prepared(root: Path, n_test: int, n_train: int = 40) -> tuple[Path, Path]:
    """(Kaggle-layout source, prepared dir) with n_test test images."""
    src, prep = root / f"src{n_test}", root / f"prep{n_test}"
    assert demo_data.main(["--out", str(src), "--train", str(n_train), "--test", str(n_test), "--seed", str(n_test)]) == 0
    data_prep.prepare(src, prep, data_prep.PrepareConfig(workers=1))
    return src, prep


def make_run(run: Path, seed: int = 0, classes: list[str] | None = None) -> Path:
    """A trainer-style run dir (config.json + model-final.params) with a varied-output untrained model."""
    import mxnet as mx

    from trainer.model import resnet18
    from trainer.presets import normalize

    classes = classes or CLASSES
    run.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    net = resnet18(len(classes), width=WIDTH)
    net.initialize(mx.init.Xavier())
    rng = np.random.default_rng(seed)
    x = mx.nd.array(normalize(np.stack([demo_data.draw(i % 10, rng) for i in range(100)])))
    net(x)
    # centre and scale the classifier on these features so argmax depends on the image
    feats = net[:-1](x).asnumpy().reshape(len(x), -1)
    dense = net[-1]
    w = dense.weight.data().asnumpy()[: len(classes)] / (feats.std(0) + 1e-6)[None, :]
    dense.weight.set_data(mx.nd.array(w))
    dense.bias.set_data(mx.nd.array(-w @ feats.mean(0)))
    net.save_parameters(str(run / "model-final.params"))
    (run / "config.json").write_text(json.dumps({"train": {"width": WIDTH}, "classes": classes, "phase": "final"}))
    return run


def reference_logits(run: Path, src: Path, ids: list[int], view: str = "none", crop: int = 0) -> np.ndarray:
    """Logits for src/test/ID.png, decoded from the PNGs here (not through data_prep), one image at a time,
    seen through the evaluation view eval_transform(crop); view flip averages the image and its mirror,
    flip-translate that pair (weight 1/2) and the pairs of the image moved one pixel up-left and down-right with
    reflected borders (1/4 each), moved here on the decoded pixels."""
    import mxnet as mx
    from PIL import Image

    from trainer.model import resnet18
    from trainer.presets import eval_transform

    net = resnet18(len(CLASSES), width=WIDTH)
    net.load_parameters(str(run / "model-final.params"))

    def pair(img: np.ndarray) -> np.ndarray:
        return sum(net(mx.nd.array(eval_transform(np.ascontiguousarray(v), crop))).asnumpy()[0] / 2
                   for v in (img, img[:, :, ::-1]))

    out = []
    for i in ids:
        img = np.asarray(Image.open(src / "test" / f"{i}.png").convert("RGB"))[None]
        if view == "none":
            out.append(net(mx.nd.array(eval_transform(img, crop))).asnumpy()[0])
        elif view == "flip":
            out.append(pair(img))
        else:
            padded = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
            out.append(pair(img) / 2 + (pair(padded[:, :32, :32]) + pair(padded[:, 2:, 2:])) / 4)
    return np.stack(out)


def read_submission(path: Path) -> tuple[list[str], list[int], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [int(r[0]) for r in rows[1:]], [r[1] for r in rows[1:]]


def mismatches(labels: list[str], logits: np.ndarray) -> list[tuple[int, str, str]]:
    """(id, expected, submitted) where the reference is confident (no near-tie) and the label differs."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > 1e-3 * (np.abs(top2[:, 1]) + 1)
    expected = [CLASSES[k] for k in logits.argmax(axis=1)]
    return [(i + 1, e, got) for i, (e, got, c) in enumerate(zip(expected, labels, confident, strict=True)) if c and e != got]


def assert_matches_reference(labels: list[str], logits: np.ndarray) -> None:
    """Submitted labels equal the reference, which varies enough that pairing ids with wrong images would show."""
    assert len(set(logits.argmax(axis=1).tolist())) >= 3, "reference predictions too uniform to test the pairing"
    assert not mismatches(labels, logits)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    """12 test images: ids 1..12, the ones d2l's str-sorted ids put in order 1, 10, 11, 12, 2, ..."""
    root = tmp_path_factory.mktemp("p12")
    src, prep = make_prepared(root, 12)
    return src, prep, make_run(root / "run", seed=1)


def test_ids_numeric_order_each_with_its_own_image(twelve, tmp_path):
    src, prep, run = twelve
    out = tmp_path / "sub.csv"
    proc = run_cli(["predict", "--prepared", str(prep), "--model", str(run), "--out", str(out), "--batch-size", "5"])
    assert proc.returncode == 0, proc.stderr
    header, ids, labels = read_submission(out)
    assert header == ["id", "label"]
    assert ids == list(range(1, 13))
    assert out.read_text().splitlines()[1:4] == [f"1,{labels[0]}", f"2,{labels[1]}", f"3,{labels[2]}"]
    assert_matches_reference(labels, reference_logits(run, src, ids))
    assert f"wrote {out}" in proc.stdout and "images/s" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temporary left beside it


def test_flip_tta_in_process_returns_figures(twelve, tmp_path):
    from predictor.predict import predict

    src, prep, run = twelve
    res = predict(prep, run, tmp_path / "tta.csv", PredictConfig(batch_size=4, tta="flip"), quiet=True)
    assert res["count"] == 12 and res["path"] == str(tmp_path / "tta.csv") and res["images_per_sec"] > 0
    _, ids, labels = read_submission(tmp_path / "tta.csv")
    assert ids == list(range(1, 13))
    assert_matches_reference(labels, reference_logits(run, src, ids, view="flip"))
    moved = predict(prep, run, tmp_path / "moved.csv", PredictConfig(batch_size=5, tta="flip-translate"), quiet=True)
    assert moved["count"] == 12
    _, ids, moved_labels = read_submission(tmp_path / "moved.csv")
    reference = reference_logits(run, src, ids, view="flip-translate")
    assert_matches_reference(moved_labels, reference)
    # the moved views weigh in: some image's label differs from the flip view's
    assert mismatches(labels, reference)
    # onnxruntime moves the raw images: the same view at eval_crop 0 (the run exported as a final phase would)
    import mxnet as mx

    from predictor.predict import load_model
    from trainer.export import write_final_model

    exported = shutil.copytree(run, tmp_path / "exported")
    write_final_model(exported, load_model(run, mx.cpu())[0], CLASSES, 0)
    predict(prep, exported, tmp_path / "ort.csv",
            PredictConfig(batch_size=5, tta="flip-translate", engine="onnxruntime"), quiet=True)
    assert (tmp_path / "ort.csv").read_bytes() == (tmp_path / "moved.csv").read_bytes()
    # default output path is RUN/submission.csv, and a second run replaces it whole
    for _ in range(2):
        predict(prep, run, None, PredictConfig(batch_size=512), quiet=True)
    assert read_submission(run / "submission.csv")[1] == list(range(1, 13))


def test_eval_crop_reaches_predict_through_the_run_record(twelve, tmp_path):
    """The run record written by training (trainer.train.write_run_record) carries eval_crop to predict."""
    from predictor.predict import predict
    from trainer.config import TrainConfig
    from trainer.train import write_run_record

    src, prep, _ = twelve
    run = make_run(tmp_path / "crop-run", seed=1)
    write_run_record(run, TrainConfig(width=WIDTH, eval_crop=36), CLASSES, "final", prep, 1, 0.1, 1)
    predict(prep, run, tmp_path / "crop.csv", PredictConfig(), quiet=True)
    _, ids, labels = read_submission(tmp_path / "crop.csv")
    at36, at0 = reference_logits(run, src, ids, crop=36), reference_logits(run, src, ids)
    assert mismatches([CLASSES[k] for k in at0.argmax(1)], at36), "the crop should change some confident prediction"
    assert_matches_reference(labels, at36)


def test_run_without_final_model_uses_newest_checkpoint(twelve, tmp_path):
    from predictor.predict import predict

    src, prep, run = twelve
    ckpt_run = tmp_path / "ckpt-run"
    (ckpt_run / "checkpoints").mkdir(parents=True)
    (ckpt_run / "config.json").write_text((run / "config.json").read_text())
    make_run(tmp_path / "older", seed=7)  # a different model in the older checkpoint
    for epoch, params in ((1, tmp_path / "older" / "model-final.params"), (2, run / "model-final.params")):
        stem = ckpt_run / "checkpoints" / f"epoch-{epoch:04d}"
        stem.with_suffix(".params").write_bytes(params.read_bytes())
        stem.with_suffix(".states").write_bytes(b"")
        stem.with_suffix(".json").write_text(json.dumps({"epoch": epoch}))
    predict(prep, ckpt_run, tmp_path / "a.csv", PredictConfig(), quiet=True)
    predict(prep, run, tmp_path / "b.csv", PredictConfig(), quiet=True)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


@pytest.mark.slow
def test_np1_and_np2_byte_identical(prepared, tmp_path):
    """97 test rows on 2 ranks (48 + 49) with batch 16: uneven shards and padded last batches."""
    run = make_run(tmp_path / "run", seed=2)
    args = ["-m", "predictor.predict", "--prepared", str(prepared), "--model", str(run), "--batch-size", "16"]
    horovodrun(1, ["python", *args, "--out", str(tmp_path / "np1.csv")])
    proc = horovodrun(2, ["python", *args, "--out", str(tmp_path / "np2.csv")])
    assert "on 2 rank(s)" in proc.stdout
    # default batch (512): one forward of 48 or 49 rows per rank instead of 97
    horovodrun(2, ["python", *args[:-2], "--out", str(tmp_path / "np2-b512.csv")])
    one, two = (tmp_path / "np1.csv").read_bytes(), (tmp_path / "np2.csv").read_bytes()
    assert one == two
    assert (tmp_path / "np2-b512.csv").read_bytes() == one
    _, ids, labels = read_submission(tmp_path / "np2.csv")
    n = len(data_prep.open_split(prepared, "test").ids)
    assert ids == list(range(1, n + 1))
    assert set(labels) <= set(CLASSES) and len(set(labels)) >= 3


@pytest.mark.slow
def test_int8_np1_and_np2_byte_identical(prepared, tmp_path):
    """Every rank calibrates on the same training images, so the quantized model is the same everywhere."""
    run = make_run(tmp_path / "run", seed=4)
    args = ["--prepared", str(prepared), "--model", str(run), "--batch-size", "16", "--precision", "int8"]
    run_cli(["predict", *args, "--out", str(tmp_path / "np1.csv")], check=True)
    proc = horovodrun(2, ["python", "-m", "predictor.predict", *args, "--out", str(tmp_path / "np2.csv")])
    assert "on 2 rank(s) (int8)" in proc.stdout
    assert (tmp_path / "np1.csv").read_bytes() == (tmp_path / "np2.csv").read_bytes()
    _, ids, labels = read_submission(tmp_path / "np1.csv")
    assert ids == list(range(1, 98)) and set(labels) <= set(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("n_test", [1, 13])
def test_tiny_and_prime_test_sets_on_two_ranks(tmp_path, n_test):
    """N=1 (fewer rows than ranks: rank 0 has none), N=13 prime with batch 4: every id once."""
    src, prep = make_prepared(tmp_path, n_test)
    run = make_run(tmp_path / "run", seed=3)
    out = tmp_path / "sub.csv"
    horovodrun(2, ["python", "-m", "predictor.predict", "--prepared", str(prep), "--model", str(run),
                   "--out", str(out), "--batch-size", "4"])
    _, ids, labels = read_submission(out)
    assert ids == list(range(1, n_test + 1))
    assert set(labels) <= set(CLASSES)
    assert not mismatches(labels, reference_logits(run, src, ids))


def test_input_errors_exit_2(twelve, tmp_path, capsys):
    from predictor.predict import main

    src, prep, run = twelve
    cases = [
        (["--prepared", str(tmp_path / "nope"), "--model", str(run)], "prepared data dir not found"),
        (["--prepared", str(prep), "--model", str(tmp_path / "nomodel")], "model run dir not found"),
        (["--prepared", str(prep), "--model", str(run), "--out", str(tmp_path / "no" / "sub.csv")], "does not exist"),
        (["--prepared", str(prep), "--model", str(tmp_path)], "config.json"),
        (["--prepared", str(prep), "--model", str(run), "--batch-size", "0"], "batch_size"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    other = make_run(tmp_path / "other", classes=CLASSES[:9] + ["zebra"])
    assert main(["--prepared", str(prep), "--model", str(other), "--out", str(tmp_path / "x.csv")]) == 2
    assert "differ from" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_out_that_is_a_directory_is_an_input_error(twelve, tmp_path, capsys):
    # exit 2 naming --out, never a raw IsADirectoryError
    from predictor.predict import main

    src, prep, run = twelve
    target = tmp_path / "subdir"
    target.mkdir()
    assert main(["--prepared", str(prep), "--model", str(run), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar10-hvd predict: ") and f"{target}: --out is a directory" in err, err
    assert list(target.iterdir()) == []
