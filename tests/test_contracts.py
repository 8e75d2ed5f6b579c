"""The file contracts: the prepared directory checked against its manifest, the run directory's start
after a kill, and the exported model usable with no project code."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports mxnet

import numpy as np
import pytest
from conftest import horovodrun, run_cli

import data_prep
from contracts.errors import InputError

TINY = ["--width", "4", "--batch-size", "16", "--lr", "0.1"]


def copy_prepared(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def edit_manifest(prep: Path, change) -> None:
    manifest = json.loads((prep / "manifest.json").read_text())
    change(manifest)
    (prep / "manifest.json").write_text(json.dumps(manifest))


def rewrite_labels(prep: Path, row: int, value: int) -> None:
    """Set one label in place (same size, so only the range check can notice)."""
    labels = np.load(prep / "trainval_labels.npy")
    labels[row] = value
    np.save(prep / "trainval_labels.npy", labels)


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def set_split(split: str, key: str, value):
    return lambda m: m["splits"][split].__setitem__(key, value)


MANIFEST_CASES = {
    "train beyond the arrays": (lambda p: edit_manifest(p, set_split("train", "count", 10_000)), "'splits.train'"),
    "train overlaps valid": (lambda p: edit_manifest(p, set_split("train", "start", 0)), "overlap"),
    "count is a string": (lambda p: edit_manifest(p, set_split("valid", "count", "54")), "'splits.valid.count'"),
    "label 99": (lambda p: rewrite_labels(p, 100, 99), "'splits.train.labels'"),
    "label -1": (lambda p: rewrite_labels(p, 0, -1), "'splits.valid.labels'"),
    "3 classes for labels 0-9": (lambda p: edit_manifest(p, lambda m: m.__setitem__("classes", m["classes"][:3])),
                                 "labels outside 0..2"),
    "file outside the dir": (lambda p: edit_manifest(p, set_split("test", "ids", "../test_ids.npy")),
                             "'splits.test.ids'"),
    "size differs": (lambda p: (p / "test_ids.npy").write_bytes((p / "test_ids.npy").read_bytes() + b"\0"),
                     "'files.test_ids.npy.bytes'"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_open_split_checks_the_manifest_against_the_arrays(prepared, tmp_path, case):
    """A manifest that does not match its arrays is refused, naming the key, for every split."""
    prep = copy_prepared(prepared, tmp_path / "prep")
    corrupt, expect = MANIFEST_CASES[case]
    corrupt(prep)
    with pytest.raises(InputError, match="manifest.json: key ") as err:
        data_prep.open_split(prep, "train")
    assert expect in str(err.value)


def test_prepare_verify_rehashes_against_the_manifest(prepared, tmp_path):
    """`prepare --verify PREP` passes a faithful copy and names a file whose bytes changed."""
    prep = copy_prepared(prepared, tmp_path / "prep")
    ok = run_cli(["prepare", "--verify", str(prep)])
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    flip_byte(prep / "trainval_images.npy")  # same size: only the hash can tell
    assert data_prep.open_split(prep, "train").images.shape[1:] == (32, 32, 3)
    bad = run_cli(["prepare", "--verify", str(prep)])
    assert bad.returncode == 2 and "trainval_images.npy" in bad.stderr and "sha256" in bad.stderr, bad.stderr


def test_train_verify_on_two_ranks_refuses_changed_bytes(prepared, tmp_path):
    """`train --verify` re-hashes on rank 0 before any rank reads; both ranks exit 2, no hang."""
    prep = copy_prepared(prepared, tmp_path / "prep")
    run_cli(["train", "--prepared", str(prep), "--out", str(tmp_path / "ok"), "--epochs", "1", "--verify", *TINY],
            check=True)  # a faithful copy passes
    flip_byte(prep / "trainval_images.npy")
    cmd = ["python", "-m", "trainer", "--prepared", str(prep), "--out", str(tmp_path / "run"), "--epochs", "1",
           "--verify", *TINY]
    proc = horovodrun(2, cmd, timeout=300, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("sha256 differs from the manifest for trainval_images.npy") == 2, output[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.fixture(scope="module")
def crop_run(prepared, tmp_path_factory):
    """A 1-epoch width-4 run whose evaluation view is eval_crop 36, and its predict submission."""
    run = tmp_path_factory.mktemp("crop") / "run"
    run_cli(["train", "--prepared", str(prepared), "--out", str(run), "--epochs", "1", "--eval-crop", "36", *TINY],
            check=True)
    run_cli(["predict", "--prepared", str(prepared), "--model", str(run)], check=True)
    return run


def test_train_and_predict_refuse_a_bad_manifest_with_exit_2(prepared, crop_run, tmp_path):
    """A manifest that does not match its arrays, through the CLIs: exit 2 with the key named, no traceback, nothing trained."""
    prep = copy_prepared(prepared, tmp_path / "prep")
    edit_manifest(prep, set_split("train", "count", "486"))
    proc = run_cli(["train", "--prepared", str(prep), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'splits.train.count'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    shutil.copy(prepared / "manifest.json", prep / "manifest.json")
    edit_manifest(prep, set_split("test", "start", 1))  # test rows beyond test_ids.npy
    proc = run_cli(["predict", "--prepared", str(prep), "--model", str(crop_run), "--out", str(tmp_path / "s.csv")])
    assert proc.returncode == 2 and "'splits.test'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s.csv").exists()


def test_start_removes_temporaries_a_kill_left(prepared, crop_run, tmp_path):
    """Empty .tmp files of a killed writer are removed by the next start; other files stay."""
    run = shutil.copytree(crop_run, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [run / "checkpoints" / f".epoch-0002.params.tmp{dead.pid}", run / f".metrics.jsonl.tmp{dead.pid}"]
    foreign = [run / "notes.tmp1", run / ".notes.tmp"]
    for p in left + foreign:
        p.write_bytes(b"")
    run_cli(["train", "--prepared", str(prepared), "--out", str(run), "--epochs", "2", "--resume",
             "--eval-crop", "36", *TINY], check=True)
    assert not [p for p in left if p.exists()]
    assert all(p.exists() for p in foreign)


CLIENT = r"""
import json, sys
import mxnet as mx
import numpy as np

run, prep = sys.argv[1], sys.argv[2]
meta = json.load(open(f"{run}/model-meta.json"))
net = mx.gluon.SymbolBlock.imports(f"{run}/{meta['symbol']}", [meta["input"]["name"]], f"{run}/{meta['params']}")
images = np.load(f"{prep}/test_images.npy")
ids = np.load(f"{prep}/test_ids.npy")
logits = np.concatenate([net(mx.nd.array(images[i:i + 32], dtype=meta["input"]["dtype"])).asnumpy()
                         for i in range(0, len(images), 32)])
own = [m for m in sys.modules if m.split(".")[0] in ("trainer", "data_prep", "launcher")]
assert not own, own
print(json.dumps({"ids": ids.tolist(), "labels": [meta["classes"][k] for k in logits.argmax(1)]}))
"""


def test_exported_model_alone_reproduces_predict(prepared, crop_run, tmp_path):
    """model-symbol.json + params take raw uint8 NHWC images and carry the eval view, so a plain
    SymbolBlock client (mxnet and numpy only) labels the demo test images exactly as `cifar10-hvd predict`."""
    (tmp_path / "client.py").write_text(CLIENT)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "client.py"), str(crop_run), str(prepared)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [line.split(",") for line in (crop_run / "submission.csv").read_text().splitlines()[1:]]
    expected = {int(i): label for i, label in rows}
    assert {i: label for i, label in zip(got["ids"], got["labels"], strict=True)} == expected
    assert len(set(expected.values())) >= 2, "a constant predictor could not show a missing eval view"
    meta = json.loads((crop_run / "model-meta.json").read_text())
    assert meta["input"] == {"name": "data", "dtype": "uint8", "layout": "NHWC", "shape": [None, 32, 32, 3],
                             "channels": "RGB", "range": [0, 255]}
    assert meta["inside"]["eval_crop"] == 36 and meta["classes"] == data_prep.read_manifest(prepared)["classes"]


def test_config_json_reads_back_typed(prepared, crop_run, tmp_path):
    """config.json is a versioned record read through TrainConfig: a wrong type names the key, predict exits 2."""
    from trainer.config import TrainConfig, read_run_record

    record = read_run_record(crop_run)
    assert isinstance(record.train, TrainConfig) and record.train.eval_crop == 36 and record.format_version == 1
    run = shutil.copytree(crop_run, tmp_path / "run")
    raw = json.loads((run / "config.json").read_text())
    raw["train"]["width"] = "4"
    (run / "config.json").write_text(json.dumps(raw))
    proc = run_cli(["predict", "--prepared", str(prepared), "--model", str(run)])
    assert proc.returncode == 2 and "key 'width' must be an integer" in proc.stderr, proc.stderr[-2000:]
