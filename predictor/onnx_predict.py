"""predict's onnxruntime engine (`predict --engine onnxruntime`): RUN/model.onnx on onnxruntime's CPU provider.

The ONNX graph takes the raw uint8 images (the evaluation view is inside it), so a shard's rows
go in as they are stored. Every forward has the same number of rows (the last batch is padded),
as in trainer.inference, so a row's label does not depend on the batching or the ranks. int8 is
onnxruntime's static quantization (QDQ, per-channel int8 weights, uint8 activations, min/max
calibrated on the same training images as MXNet's int8) of the convolutions. Weights keep 7 bits
(reduce_range): x86 CPUs without VNNI multiply uint8 by int8 in saturating int16 pairs, and full-range
weights flipped labels the float model was clear about (tests/test_onnx.py).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from contracts.errors import InputError
from trainer import onnx_export
from trainer.onnx_export import INPUT_NAME, ONNX_MODEL

MAX_MODEL_BYTES = 1 << 30  # a ResNet-18 at width 64 is 45 MB; far larger is not a run's model.onnx
QUANTIZED_OPS = ["Conv"]  # the classifier (Gemm) stays float: 8-bit logits flip near ties; so does the preprocessing


def model_bytes(model_dir: Path) -> tuple[bytes, str]:
    """(serialized model, how it was found): RUN/model.onnx, else RUN's MXNet export converted in memory."""
    path = model_dir / ONNX_MODEL
    if not path.exists():
        return onnx_export.build(model_dir).SerializeToString(), (
            f"{path} not found: converted {model_dir}'s MXNet export in memory (cifar10-hvd export writes it)")
    if not path.is_file() or path.stat().st_size > MAX_MODEL_BYTES:
        raise InputError(f"{path}: not a regular file under {MAX_MODEL_BYTES >> 20} MiB")
    return path.read_bytes(), f"read {path}"


def check_session(session, where: Path) -> list[str]:
    """The class names in the model's metadata, once its input is the uint8 N x 32 x 32 x 3 contract."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape[1:]) != [32, 32, 3]:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise InputError(f"{where}: expected one input uint8 (N, 32, 32, 3), got {got}")
    try:
        classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    except (KeyError, ValueError):
        classes = None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise InputError(f"{where}: no class names in its metadata_props (write it with cifar10-hvd export)")
    return classes


class CalibrationImages:
    """onnxruntime's CalibrationDataReader over uint8 images, in batches of 64."""

    def __init__(self, images: np.ndarray, rows: int = 64):
        self._batches = iter([{INPUT_NAME: images[i:i + rows]} for i in range(0, len(images), rows)])

    def get_next(self):
        return next(self._batches, None)


def quantize(data: bytes, calib: np.ndarray | None) -> bytes:
    """The int8 model: BatchNorm folded (quant_pre_process), then quantize_static calibrated on calib."""
    onnx = onnx_export.require("onnx")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        raise InputError("int8 precision needs calibration images (the prepared train split is empty)")
    with tempfile.TemporaryDirectory(prefix="cifar10-hvd-int8-") as tmp:
        src, pre, out = (str(Path(tmp) / n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(data)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, CalibrationImages(np.ascontiguousarray(calib)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS, reduce_range=True)
        model = onnx.load(out)
    onnx.helper.set_model_props(model, {p.key: p.value for p in onnx.load_from_string(data).metadata_props})
    return model.SerializeToString()


def load(model_dir: str | Path, precision: str, calib: np.ndarray | None, threads: int, log=None):
    """(onnxruntime session, class names) for RUN's model at precision (float32 or int8)."""
    onnx_export.require("onnxruntime")
    model_dir = Path(model_dir)
    data, how = model_bytes(model_dir)
    if log is not None:
        log(f"predict: {how}")
    if precision == "int8":
        data = quantize(data, calib)
    elif precision != "float32":
        raise InputError(f"precision {precision!r}: the onnxruntime engine runs float32 or int8")
    try:
        session = onnx_export.session(data, threads=threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types for a bad file
        raise InputError(f"{model_dir / ONNX_MODEL}: onnxruntime cannot load it: {e}") from None
    return session, check_session(session, model_dir / ONNX_MODEL)


def logits(session, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """Logits of a uint8 NHWC batch; tta='flip' adds the mirrored (left-right) view's, as predict --tta flip."""
    out = session.run(None, {INPUT_NAME: x})[0]
    if tta == "flip":
        out = out + session.run(None, {INPUT_NAME: np.ascontiguousarray(x[:, :, ::-1])})[0]
    return out


def predict_rows(session, images: np.ndarray, batch_size: int, tta: str = "none", progress=None) -> np.ndarray:
    """Class index (int32) for every row of images (uint8 N x 32 x 32 x 3), in fixed-shape batches."""
    from trainer.inference import RELEASE_ROWS, page_releaser

    n = len(images)
    preds = np.empty(n, dtype=np.int32)
    bs = max(1, min(batch_size, n))
    buf = np.zeros((bs, *images.shape[1:]), dtype=np.uint8)
    release, released = page_releaser(images), 0
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        buf[: stop - start] = images[start:stop]
        preds[start:stop] = logits(session, buf, tta)[: stop - start].argmax(axis=1)
        if progress is not None:
            progress.update(stop - start)
        if stop - released >= RELEASE_ROWS or stop == n:
            release(released, stop)
            released = stop
    return preds
