"""predict's onnxruntime engine (`predict --engine onnxruntime`): RUN/model.onnx on onnxruntime's CPU provider.

The ONNX graph takes the raw uint8 images (the evaluation view is inside it), so a shard's rows
go in as they are stored. Every forward has the same number of rows (the last batch is padded),
as in trainer.inference, so a row's label does not depend on the batching or the ranks. int8 runs
RUN/model-int8.onnx, or quantizes the float model in memory the same way (trainer.onnx_int8).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contracts.errors import InputError
from trainer import onnx_export, onnx_int8
from trainer.inference import combine_views
from trainer.onnx_export import INPUT_NAME, ONNX_MODEL


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


def load(model_dir: str | Path, precision: str, calib: np.ndarray | None, threads: int, log=None):
    """(onnxruntime session, class names) for RUN's model at precision (float32 or int8)."""
    onnx_export.require("onnxruntime")
    model_dir = Path(model_dir)
    if precision == "int8":
        data, how = onnx_int8.int8_model(model_dir, calib)
    elif precision == "float32":
        data, how = onnx_int8.float_model(model_dir)
    else:
        raise InputError(f"precision {precision!r}: the onnxruntime engine runs float32 or int8")
    if log is not None:
        log(f"predict: {how}")
    try:
        session = onnx_export.session(data, threads=threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types for a bad file
        raise InputError(f"{model_dir / ONNX_MODEL}: onnxruntime cannot load it: {e}") from None
    return session, check_session(session, model_dir / ONNX_MODEL)


def logits(session, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """Logits of a uint8 NHWC batch in the tta view (trainer.inference.combine_views; the moved views are the raw
    images moved, the same as moving the model's input when train.eval_crop is 0)."""
    def moved(batch: np.ndarray) -> list[np.ndarray]:
        h, w = batch.shape[1:3]
        padded = np.pad(batch, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        return [np.ascontiguousarray(padded[:, 0:h, 0:w]), np.ascontiguousarray(padded[:, 2:h + 2, 2:w + 2])]

    return combine_views(lambda batch: session.run(None, {INPUT_NAME: batch})[0], x, tta,
                         lambda batch: np.ascontiguousarray(batch[:, :, ::-1]), moved)[1]


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
