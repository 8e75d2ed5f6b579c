"""predict's section of the configuration schema (`predict:`), its defaults the d2l chapter's."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config import TTA_VIEWS


@dataclass
class PredictConfig:
    """Inference options for predictor.predict."""

    batch_size: int = field(default=512, metadata={"help": "per-rank inference batch size", "min": 1})
    tta: str = field(default="none", metadata={"help": "test-time augmentation: flip = the image and its mirror, flip-translate = that pair and the pairs moved one pixel diagonally (airbench's)", "choices": TTA_VIEWS})
    precision: str = field(default="float32", metadata={"help": "int8: MKLDNN-quantized CPU inference, calibrated on 512 training images (benchmarks/bench_predict.py gate)", "choices": ("float32", "int8")})
    threads: int = field(default=0, metadata={"help": "OMP threads per rank (0 = cores / ranks on this host)", "min": 0})
    engine: str = field(default="mxnet", metadata={"help": "inference engine: mxnet, or onnxruntime (RUN/model.onnx on the CPU; int8 by onnxruntime's static quantization; pip install '.[onnx]')", "choices": ("mxnet", "onnxruntime")})
