"""The int8 ONNX model, RUN/model-int8.onnx: onnxruntime's static quantization of the run's model.onnx.

`cifar10-hvd export --model RUN --precision int8 --prepared P` writes it, and `predict --engine onnxruntime
--precision int8` runs it (quantizing in memory, the same way, when it is absent), so a client with only
onnxruntime and numpy runs the very graph predict ran. The quantization: BatchNorm folded
(quant_pre_process), then QDQ with per-channel int8 weights and uint8 activations, min/max calibrated on
the first CALIBRATION_ROWS training images (MXNet's int8 calibrates on the same rows), convolutions
only. Weights keep 7 bits (reduce_range): x86 CPUs without VNNI multiply uint8 by int8 in saturating
int16 pairs, and full-range weights flipped labels the float model was clear about. The metadata names
the float model it came from (sha256 of model.onnx's bytes), so a model-int8.onnx left from another
model is refused rather than run.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from contracts.errors import InputError
from contracts.files import read_bounded
from trainer import onnx_export
from trainer.onnx_export import INPUT_NAME, ONNX_MODEL

INT8_MODEL = "model-int8.onnx"
CALIBRATION_ROWS = 512
QUANTIZED_OPS = ["Conv"]  # the classifier (Gemm) stays float: 8-bit logits flip near ties; so does the preprocessing
MAX_MODEL_BYTES = 1 << 30  # a ResNet-18 at width 64 is 45 MB; far larger is not a run's model


def calibration_images(prepared: Path, manifest: dict) -> np.ndarray:
    """The rows both engines' int8 calibrate on: the first CALIBRATION_ROWS of the prepared train split."""
    import data_prep

    train = data_prep.open_split(prepared, "train", manifest)
    calib = np.asarray(train.images[: min(CALIBRATION_ROWS, len(train.images))])
    if len(calib) == 0:
        raise InputError(f"{prepared}: int8 precision needs calibration images (the prepared train split is empty)")
    return calib


def read_model(path: Path) -> bytes:
    """path's bytes, once it is a regular file of a plausible size (contracts.files.read_bounded)."""
    try:
        return read_bounded(path, MAX_MODEL_BYTES, "ONNX model")
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror}") from None


def float_model(model_dir: Path) -> tuple[bytes, str]:
    """(serialized float32 model, how it was found): RUN/model.onnx, else RUN's MXNet export converted in memory."""
    path = model_dir / ONNX_MODEL
    if not path.exists():
        return onnx_export.build(model_dir).SerializeToString(), (
            f"{path} not found: converted {model_dir}'s MXNet export in memory (cifar10-hvd export writes it)")
    return read_model(path), f"read {path}"


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CalibrationImages:
    """onnxruntime's CalibrationDataReader over uint8 images, in batches of 64."""

    def __init__(self, images: np.ndarray, rows: int = 64):
        self._batches = iter([{INPUT_NAME: images[i:i + rows]} for i in range(0, len(images), rows)])

    def get_next(self):
        return next(self._batches, None)


def quantize(data: bytes, calib: np.ndarray) -> bytes:
    """The int8 model of the float model data, calibrated on calib; its metadata adds the source's sha256."""
    onnx = onnx_export.require("onnx")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cifar10-hvd-int8-") as tmp:
        src, pre, out = (str(Path(tmp) / n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(data)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, CalibrationImages(np.ascontiguousarray(calib)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS, reduce_range=True)
        model = onnx.load(out)
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    props["int8"] = json.dumps({"from_sha256": fingerprint(data), "calibration_rows": int(len(calib)),
                                "weights": "int8 per channel, 7 bits", "activations": "uint8 per tensor",
                                "quantized": QUANTIZED_OPS})
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def int8_model(model_dir: Path, calib: np.ndarray | None) -> tuple[bytes, str]:
    """(serialized int8 model, how it was found): RUN/model-int8.onnx when it was quantized from the run's
    float model, else that float model quantized in memory on calib."""
    data, how = float_model(model_dir)
    path = model_dir / INT8_MODEL
    if path.exists():
        int8 = read_model(path)
        source = recorded_source(int8, path)
        if source != fingerprint(data):
            raise InputError(f"{path} was quantized from another model than {model_dir / ONNX_MODEL} "
                             f"(sha256 {source[:12]}... against {fingerprint(data)[:12]}...); write it again with "
                             f"cifar10-hvd export --model {model_dir} --precision int8 --prepared P")
        return int8, f"read {path}"
    if calib is None:
        raise InputError("int8 precision needs calibration images (the prepared train split)")
    return quantize(data, calib), f"{how}; quantized in memory ({path} not found)"


def recorded_source(int8: bytes, path: Path) -> str:
    """The sha256 of the float model an int8 model says it came from."""
    onnx = onnx_export.require("onnx")
    try:
        props = {p.key: p.value for p in onnx.load_from_string(int8).metadata_props}
        return str(json.loads(props["int8"])["from_sha256"])
    except Exception as e:  # noqa: BLE001 - a corrupt protobuf raises DecodeError, a missing key KeyError
        raise InputError(f"{path}: not an int8 model written by cifar10-hvd export ({type(e).__name__}: {e})") from None


def export(model_dir: Path, prepared: Path, out: Path) -> Path:
    """Write RUN's int8 model to out, calibrated on prepared's training images."""
    import data_prep

    try:
        manifest = data_prep.read_manifest(prepared)
    except (InputError, OSError, ValueError) as e:
        raise InputError(f"{prepared}: cannot open the prepared dir for calibration: {e}") from None
    calib = calibration_images(prepared, manifest)
    data, _ = float_model(model_dir)
    int8 = quantize(data, calib)
    onnx_export.write_bytes(int8, out)
    return out
