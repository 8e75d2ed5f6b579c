"""ONNX export and predict's onnxruntime engine on a real (briefly trained) demo run.

The run is trained by `cifar10-hvd train` with the 36 eval crop, so the exported graph carries the
resample as well as the normalisation; its final phase writes model.onnx beside the MXNet export.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import horovodrun, run_cli, small_tmpfs

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before mxnet is first imported in this process

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install '.[onnx]'")
onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install '.[onnx]'")

TRAIN = ["--epochs", "15", "--width", "8", "--batch-size", "16", "--lr", "0.05", "--eval-crop", "36",
         "--stem-pool", "3"]
CLEAR_MARGIN = 0.05  # of a row's logit range: closer top-2 logits are near-ties that 8-bit rounding may flip

CLIENT = r"""
import json, sys
import numpy as np
import onnxruntime as ort

model, prep = sys.argv[1], sys.argv[2]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes, contract = json.loads(meta["classes"]), json.loads(meta["input"])
images, ids = np.load(f"{prep}/test_images.npy"), np.load(f"{prep}/test_ids.npy")
logits = np.concatenate([session.run(None, {contract["name"]: images[i:i + 32].astype(contract["dtype"])})[0]
                         for i in range(0, len(images), 32)])
own = [m for m in sys.modules if m.split(".")[0] in ("trainer", "data_prep", "launcher", "mxnet", "onnx")]
assert not own, own
print(json.dumps({"ids": ids.tolist(), "labels": [classes[k] for k in logits.argmax(1)], "logits": logits.tolist()}))
"""


def submission(path: Path) -> dict[int, str]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return {int(i): label for i, label in rows}


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    """A 15-epoch width-8 run (eval crop 36, a max-pooled stem) and its MXNet predict (RUN/submission.csv)."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(out), *TRAIN], check=True)
    assert f"wrote {out / 'model.onnx'}" in proc.stdout + proc.stderr
    run_cli(["predict", "--prepared", str(prepared), "--model", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def client(run, prepared, tmp_path_factory):
    """What the onnxruntime-and-numpy client makes of RUN/model.onnx: ids, labels, logits."""
    return run_client(run / "model.onnx", prepared, tmp_path_factory.mktemp("client"))


def test_client_with_only_onnxruntime_and_numpy_labels_as_predict(run, client):
    expected = submission(run / "submission.csv")
    assert dict(zip(client["ids"], client["labels"], strict=True)) == expected
    assert len(set(expected.values())) >= 3, "too uniform a model could not show a missing eval view"


def test_model_onnx_is_checked_opset_13_with_classes_and_input_contract(run, prepared, tmp_path):
    import data_prep

    model = onnx.load(str(run / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["classes"] == data_prep.read_manifest(prepared)["classes"]
    assert meta["input"] == {"name": "data", "dtype": "uint8", "layout": "NHWC", "shape": [None, 32, 32, 3],
                             "channels": "RGB", "range": [0, 255]}
    assert meta["inside"]["eval_crop"] == 36
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and dims[1:] == [32, 32, 3]
    assert out.name == "logits"
    # the export command writes the same model as the final phase did
    proc = run_cli(["export", "--model", str(run), "--onnx", str(tmp_path / "again.onnx")], check=True)
    assert f"wrote {tmp_path / 'again.onnx'} (opset 13" in proc.stdout
    assert (tmp_path / "again.onnx").read_bytes() == (run / "model.onnx").read_bytes()


def test_onnxruntime_engine_writes_the_same_submission_as_mxnet(run, prepared, tmp_path):
    args = ["--prepared", str(prepared), "--model", str(run), "--batch-size", "16"]
    proc = run_cli(["predict", *args, "--engine", "onnxruntime", "--out", str(tmp_path / "ort.csv")], check=True)
    assert "(float32, onnxruntime)" in proc.stdout and f"read {run / 'model.onnx'}" in proc.stdout
    assert (tmp_path / "ort.csv").read_bytes() == (run / "submission.csv").read_bytes()
    horovodrun(2, ["python", "-m", "predictor.predict", *args, "--engine", "onnxruntime",
                   "--out", str(tmp_path / "ort-np2.csv")])
    assert (tmp_path / "ort-np2.csv").read_bytes() == (run / "submission.csv").read_bytes()
    for engine in ("mxnet", "onnxruntime"):
        run_cli(["predict", *args, "--tta", "flip", "--engine", engine, "--out", str(tmp_path / f"{engine}-flip.csv")],
                check=True)
    assert (tmp_path / "mxnet-flip.csv").read_bytes() == (tmp_path / "onnxruntime-flip.csv").read_bytes()
    # moved views of raw images are not moved views of the 36 crop's resample inside model.onnx: refused
    proc = run_cli(["predict", *args, "--tta", "flip-translate", "--engine", "onnxruntime",
                    "--out", str(tmp_path / "moved.csv")])
    assert proc.returncode == 2 and "train.eval_crop 36" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "moved.csv").exists()


def test_engine_is_a_predict_config_key(run, prepared, tmp_path):
    (tmp_path / "c.yaml").write_text("predict: {engine: onnxruntime}\n")
    proc = run_cli(["predict", "--prepared", str(prepared), "--model", str(run), "--config", str(tmp_path / "c.yaml"),
                    "--out", str(tmp_path / "s.csv")], check=True)
    assert "(float32, onnxruntime)" in proc.stdout
    proc = run_cli(["predict", "--prepared", str(prepared), "--model", str(run), "--engine", "tensorrt"])
    assert proc.returncode == 2 and "must be one of mxnet, onnxruntime" in proc.stderr, proc.stderr[-2000:]


def test_a_run_without_model_onnx_is_converted_in_memory_and_left_as_it_was(run, prepared, tmp_path):
    old = shutil.copytree(run, tmp_path / "old")
    (old / "model.onnx").unlink()
    before = sorted(p.name for p in old.iterdir())
    proc = run_cli(["predict", "--prepared", str(prepared), "--model", str(old), "--engine", "onnxruntime",
                    "--out", str(tmp_path / "s.csv")], check=True)
    assert f"{old / 'model.onnx'} not found: converted" in proc.stdout
    assert (tmp_path / "s.csv").read_bytes() == (run / "submission.csv").read_bytes()
    assert sorted(p.name for p in old.iterdir()) == before


def clear_rows(logits: np.ndarray) -> np.ndarray:
    """Rows whose top-2 logits are further apart than CLEAR_MARGIN of the row's logit range."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > CLEAR_MARGIN * (logits.max(1) - logits.min(1))


def test_int8_on_both_engines_agrees_with_the_float32_client(run, prepared, client, tmp_path):
    """onnxruntime's static int8 (and MXNet's) label >= 99.9% of the rows the float32 model does not call a near-tie."""
    clear = clear_rows(np.array(client["logits"]))
    assert clear.mean() >= 0.5, "the model is too undecided to measure int8 agreement"
    want = np.array(client["labels"])[clear]
    for engine in ("mxnet", "onnxruntime"):
        out = tmp_path / f"{engine}-int8.csv"
        proc = run_cli(["predict", "--prepared", str(prepared), "--model", str(run), "--engine", engine,
                        "--precision", "int8", "--out", str(out)], check=True)
        assert "(int8" in proc.stdout
        got = np.array([submission(out)[i] for i in client["ids"]])[clear]
        assert (got == want).mean() >= 0.999, (engine, int((got != want).sum()), len(want))
    # every rank quantizes alike (same calibration images), so the ranks' labels are those of one process
    horovodrun(2, ["python", "-m", "predictor.predict", "--prepared", str(prepared), "--model", str(run), "--engine",
                   "onnxruntime", "--precision", "int8", "--out", str(tmp_path / "np2.csv")])
    assert (tmp_path / "np2.csv").read_bytes() == (tmp_path / "onnxruntime-int8.csv").read_bytes()


def run_client(model: Path, prepared: Path, tmp_path: Path) -> dict:
    """What the onnxruntime-and-numpy client makes of model: ids, labels, logits."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.run([sys.executable, "-I", str(script), str(model), str(prepared)],
                          capture_output=True, text=True, timeout=300, cwd=script.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_int8_client_reproduces_predicts_int8_labels(run, prepared, tmp_path):
    """export --precision int8 writes the graph predict's int8 ran, so a client with onnxruntime alone repeats it."""
    own = shutil.copytree(run, tmp_path / "run")
    args = ["predict", "--prepared", str(prepared), "--model", str(own), "--engine", "onnxruntime", "--precision",
            "int8", "--batch-size", "16"]
    proc = run_cli([*args, "--out", str(tmp_path / "memory.csv")], check=True)
    assert "quantized in memory" in proc.stdout, proc.stdout
    proc = run_cli(["export", "--model", str(own), "--precision", "int8", "--prepared", str(prepared)], check=True)
    assert f"wrote {own / 'model-int8.onnx'} (int8, opset 13" in proc.stdout
    model = onnx.load(str(own / "model-int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["int8"]["calibration_rows"] == 512 and meta["classes"] and meta["input"]["dtype"] == "uint8"
    client = run_client(own / "model-int8.onnx", prepared, tmp_path)
    want = submission(tmp_path / "memory.csv")
    got = dict(zip(client["ids"], client["labels"], strict=True))
    assert got.keys() == want.keys()
    agree = sum(got[i] == want[i] for i in want) / len(want)
    print(f"int8 client against predict --precision int8: {agree:.4%} of {len(want)}")
    assert agree >= 0.999
    proc = run_cli([*args, "--out", str(tmp_path / "file.csv")], check=True)
    assert f"read {own / 'model-int8.onnx'}" in proc.stdout, proc.stdout
    assert (tmp_path / "file.csv").read_bytes() == (tmp_path / "memory.csv").read_bytes()


def test_an_int8_model_of_another_model_or_garbage_is_refused(run, prepared, tmp_path):
    own = shutil.copytree(run, tmp_path / "run")
    run_cli(["export", "--model", str(own), "--precision", "int8", "--prepared", str(prepared)], check=True)
    args = ["predict", "--prepared", str(prepared), "--model", str(own), "--engine", "onnxruntime", "--precision",
            "int8", "--out", str(tmp_path / "s.csv")]
    retrained = onnx.load(str(own / "model.onnx"))
    retrained.graph.initializer[0].raw_data = bytes(len(retrained.graph.initializer[0].raw_data))
    onnx.save(retrained, str(own / "model.onnx"))
    proc = run_cli(args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{own / 'model-int8.onnx'} was quantized from another model than {own / 'model.onnx'}" in proc.stderr
    (own / "model-int8.onnx").write_bytes(b"\x08\x07not a model")
    proc = run_cli(args)
    assert proc.returncode == 2 and f"{own / 'model-int8.onnx'}: not an int8 model written by cifar10-hvd export" \
        in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "s.csv").exists()
    proc = run_cli(["export", "--model", str(own), "--precision", "int8", "--onnx", str(tmp_path / "q.onnx")])
    assert proc.returncode == 2 and "--precision int8 needs --prepared" in proc.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_export_refuses_an_int8_mkldnn_graph_by_its_operators(run, prepared, tmp_path):
    import mxnet as mx

    import data_prep
    from predictor.predict import load_model

    q = shutil.copytree(run, tmp_path / "q")
    calib = np.asarray(data_prep.open_split(prepared, "train").images[:64])
    net, *_ = load_model(q, mx.cpu(), "int8", calib)
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / "int8"))
    shutil.copy(tmp_path / "int8-symbol.json", q / "model-symbol.json")
    shutil.copy(tmp_path / "int8-0000.params", q / "model-0000.params")
    proc = run_cli(["export", "--model", str(q), "--onnx", str(tmp_path / "q.onnx")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cifar10-hvd export: {q / 'model-symbol.json'}: operators ONNX opset 13 cannot express: " in proc.stderr
    assert "_sg_mkldnn_conv" in proc.stderr and "int8-quantized MKLDNN graph" in proc.stderr
    assert not (tmp_path / "q.onnx").exists() and not list(tmp_path.glob(".q.onnx*"))


def test_export_refuses_missing_exports_and_bad_targets_with_exit_2(run, tmp_path):
    tune = tmp_path / "tune"
    tune.mkdir()
    shutil.copy(run / "config.json", tune / "config.json")
    proc = run_cli(["export", "--model", str(tune)])
    assert proc.returncode == 2 and f"{tune / 'model-symbol.json'}: not found; only a run's final phase" in proc.stderr
    proc = run_cli(["export", "--model", str(run), "--onnx", str(tmp_path)])
    assert proc.returncode == 2 and "--onnx must be a file path in an existing folder" in proc.stderr
    garbled = shutil.copytree(run, tmp_path / "garbled")
    (garbled / "model-symbol.json").write_text('{"nodes": [{"op": "null"}, {"op": "MyCustomOp"}]}')
    proc = run_cli(["export", "--model", str(garbled), "--onnx", str(tmp_path / "g.onnx")])
    assert proc.returncode == 2 and "cannot express: MyCustomOp" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "g.onnx").exists()
    proc = run_cli(["predict", "--prepared", str(tmp_path), "--model", str(tune), "--engine", "onnxruntime"])
    assert proc.returncode == 2 and "prepared" in proc.stderr


def test_a_full_disk_while_exporting_names_the_file_and_leaves_nothing(run, tmp_path):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        proc = run_cli(["export", "--model", str(run), "--onnx", str(disk / "m.onnx")])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"{disk / 'm.onnx'}: No space left on device" in proc.stderr
        assert list(disk.iterdir()) == []
