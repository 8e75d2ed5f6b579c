"""The run directory's contract: the final model and its self-contained export, and what a start does
to a directory a killed run left.

Files: config.json (trainer.config.RunRecord), metrics.jsonl and curves.png (trainer.metrics), checkpoints/
(trainer.checkpoint), model-final.params (the Gluon parameters predict loads), and the export for
inference elsewhere: model-symbol.json + model-0000.params, a graph from raw uint8 NHWC 32x32 RGB
images to logits with the run's evaluation view inside it, described by model-meta.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.files import atomic_write, atomic_write_text, remove_stale_temps
from trainer.checkpoint import CHECKPOINT_DIR, FINAL_PARAMS

META_VERSION = 1
MODEL_SYMBOL, MODEL_PARAMS, MODEL_META = "model-symbol.json", "model-0000.params", "model-meta.json"
INPUT_SHAPE = (32, 32, 3)


def start(run_dir: str | Path) -> list[Path]:
    """Before a run writes RUN: remove the temporaries of writers that died (kill -9 mid-write); return them."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINT_DIR)


def _raw_image_block(net, crop: int):
    """net behind the evaluation view (trainer.presets.eval_transform): uint8 NHWC in, the `crop` resample
    and the normalization as graph constants, logits out."""
    import mxnet as mx
    from mxnet import gluon

    from trainer.presets import _SCALE, _SHIFT, INDEX, RESIZE, ROWS

    class RawImages(gluon.HybridBlock):
        def __init__(self):
            super().__init__(prefix="eval_view_")
            with self.name_scope():
                self.scale = self.params.get_constant("scale", mx.nd.array(_SCALE.reshape(1, 3, 1, 1)))
                self.shift = self.params.get_constant("shift", mx.nd.array(_SHIFT.reshape(1, 3, 1, 1)))
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
    atomic_write(run_dir / FINAL_PARAMS, net.save_parameters)
    ctx = next(iter(net.collect_params().values())).list_ctx()[0]
    block = _raw_image_block(net, crop)
    block.collect_params("eval_view_.*").initialize(ctx=ctx)
    block.hybridize()
    block(mx.nd.zeros((1, *INPUT_SHAPE), dtype="uint8", ctx=ctx))
    tmp = run_dir / f".export.tmp{os.getpid()}"
    tmp.mkdir()
    block.export(str(tmp / "model"))
    for name in (MODEL_SYMBOL, MODEL_PARAMS):
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
    meta = {"version": META_VERSION, "symbol": MODEL_SYMBOL, "params": MODEL_PARAMS, "classes": list(classes),
            "input": {"name": "data", "dtype": "uint8", "layout": "NHWC", "shape": [None, *INPUT_SHAPE],
                      "channels": "RGB", "range": [0, 255]},
            "output": {"shape": [None, len(classes)], "meaning": "logits; argmax indexes classes"},
            "inside": {"normalize": {"mean": MEAN.tolist(), "std": STD.tolist()}, "eval_crop": crop},
            "load": "mxnet.gluon.SymbolBlock.imports(symbol, ['data'], params)"}
    atomic_write_text(run_dir / MODEL_META, json.dumps(meta, indent=1) + "\n")
