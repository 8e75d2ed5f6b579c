"""The final model written for serving: RUN/model-final.params, then the evaluation view and the network
exported as one MXNet graph (raw uint8 NHWC images in, logits out) with model-meta.json describing it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainer.rundir import (
    FINAL_PARAMS,
    INPUT_SHAPE,
    META_VERSION,
    MODEL_META,
    MODEL_PARAMS,
    MODEL_SYMBOL,
    mxnet_writes,
    write_file,
    write_text,
    writing,
)


def _raw_image_block(net, crop: int):
    """net behind the evaluation view (trainer.presets.eval_transform): uint8 NHWC in, the `crop` resample
    and the normalization as graph constants, logits out."""
    import mxnet as mx
    from mxnet import gluon

    from trainer.presets import INDEX, NORM_SCALE, NORM_SHIFT, RESIZE, ROWS

    class RawImages(gluon.HybridBlock):
        def __init__(self):
            super().__init__(prefix="eval_view_")
            with self.name_scope():
                self.scale = self.params.get_constant("scale", mx.nd.array(NORM_SCALE.reshape(1, 3, 1, 1)))
                self.shift = self.params.get_constant("shift", mx.nd.array(NORM_SHIFT.reshape(1, 3, 1, 1)))
                if crop:
                    self.resample = self.params.get_constant("resample",
                                                             mx.nd.array(ROWS[INDEX[crop, (RESIZE - crop) // 2]]))
            self.net = net

        def hybrid_forward(self, F, x, scale, shift, resample=None):
            x = F.transpose(F.cast(x, "float32"), axes=(0, 3, 1, 2))
            if crop:  # A @ x @ A.T per channel: columns, then rows through a swap
                x = F.dot(x, resample, transpose_b=True)
                x = F.swapaxes(F.dot(F.swapaxes(x, 2, 3), resample, transpose_b=True), 2, 3)
            return self.net(F.broadcast_add(F.broadcast_mul(x, scale), shift))

    return RawImages()


def write_final_model(run_dir: str | Path, net, classes: list[str], crop: int) -> None:
    """RUN/model-final.params, then the self-contained export and model-meta.json, each published by rename."""
    import mxnet as mx

    from trainer.presets import MEAN, STD

    run_dir = Path(run_dir)
    write_file(run_dir / FINAL_PARAMS, net.save_parameters)
    ctx = next(iter(net.collect_params().values())).list_ctx()[0]
    block = _raw_image_block(net, crop)
    block.collect_params("eval_view_.*").initialize(ctx=ctx)
    block.hybridize()
    block(mx.nd.zeros((1, *INPUT_SHAPE), dtype="uint8", ctx=ctx))
    tmp = run_dir / f".export.tmp{os.getpid()}"
    tmp.mkdir()
    try:
        with writing(run_dir / MODEL_PARAMS), mxnet_writes(tmp / MODEL_PARAMS):
            block.export(str(tmp / "model"))
        for name in (MODEL_SYMBOL, MODEL_PARAMS):
            os.replace(tmp / name, run_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"version": META_VERSION, "symbol": MODEL_SYMBOL, "params": MODEL_PARAMS, "classes": list(classes),
            "input": {"name": "data", "dtype": "uint8", "layout": "NHWC", "shape": [None, *INPUT_SHAPE],
                      "channels": "RGB", "range": [0, 255]},
            "output": {"shape": [None, len(classes)], "meaning": "logits; argmax indexes classes"},
            "inside": {"normalize": {"mean": MEAN.tolist(), "std": STD.tolist()}, "eval_crop": crop},
            "load": "mxnet.gluon.SymbolBlock.imports(symbol, ['data'], params)"}
    write_text(run_dir / MODEL_META, json.dumps(meta, indent=1) + "\n")
