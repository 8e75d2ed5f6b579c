"""The d2l chapter's ResNet-18 for 32x32 inputs, with every channel count scaled by width/64 (and, optionally, per stage)."""
from __future__ import annotations

from mxnet.gluon import nn


class Residual(nn.HybridBlock):
    """Two 3x3 conv-BN layers with an identity or 1x1 strided projection shortcut (d2l's Residual)."""

    def __init__(self, num_channels: int, use_1x1conv: bool = False, strides: int = 1, bn_momentum: float = 0.9,
                 **kwargs):
        super().__init__(**kwargs)
        self.conv1 = nn.Conv2D(num_channels, kernel_size=3, padding=1, strides=strides)
        self.conv2 = nn.Conv2D(num_channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2D(num_channels, kernel_size=1, strides=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm(momentum=bn_momentum)
        self.bn2 = nn.BatchNorm(momentum=bn_momentum)

    def hybrid_forward(self, F, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        return F.relu(Y + X)


D2L_STAGE_MULT = "1,2,4,8"


def stage_widths(width: int, stage_mult: str = D2L_STAGE_MULT) -> tuple[int, ...]:
    """The four stages' channels: width times each of stage_mult's comma-separated multiples (TrainConfig.stage_mult)."""
    return tuple(width * int(m) for m in stage_mult.split(","))


ARCH_KEYS = ("width", "stage_mult", "stem_stride", "stem_pool")  # the TrainConfig keys that shape the model


def resnet18(num_classes: int = 10, width: int = 64, stage_mult: str = D2L_STAGE_MULT,
             stem_stride: int = 1, stem_pool: int = 0, bn_momentum: float = 0.9) -> nn.HybridSequential:
    """ResNet-18 as in d2l: 3x3 stem, no max-pool, stages of width x (1, 2, 4, 8) (or x stage_mult).

    stem_stride 2 halves the resolution in the stem, so the stages run at 16, 8, 4 and 2 pixels: the same
    layers at a quarter of the arithmetic per channel, which wider stages can spend where maps are small.
    stem_pool 2 or 3 halves it after the stem's ReLU instead, by a 2x2 max-pool (airbench's) or a 3x3 one
    padded by 1 (ImageNet ResNet-18's): the stem's filters see every position, the pool keeps the strongest.
    bn_momentum: every BatchNorm's running-statistics momentum (gluon's and d2l's 0.9); it shapes no parameter.
    """
    widths = stage_widths(width, stage_mult)
    if len(widths) != 4 or widths[0] != width:
        raise ValueError(f"stage_mult {stage_mult!r}: four multiples of width, the first 1")
    net = nn.HybridSequential()
    net.add(nn.Conv2D(width, kernel_size=3, strides=stem_stride, padding=1), nn.BatchNorm(momentum=bn_momentum),
            nn.Activation("relu"))
    if stem_pool:
        net.add(nn.MaxPool2D(pool_size=stem_pool, strides=2, padding=(stem_pool - 1) // 2))

    def stage(num_channels: int, first: bool) -> nn.HybridSequential:
        blk = nn.HybridSequential()
        blk.add(Residual(num_channels, use_1x1conv=not first, strides=1 if first else 2, bn_momentum=bn_momentum))
        blk.add(Residual(num_channels, bn_momentum=bn_momentum))
        return blk

    net.add(*(stage(w, i == 0) for i, w in enumerate(widths)))
    net.add(nn.GlobalAvgPool2D(), nn.Dense(num_classes))
    return net


def from_config(cfg, num_classes: int) -> nn.HybridSequential:
    """The (uninitialised) ResNet-18 a TrainConfig describes (its ARCH_KEYS)."""
    return resnet18(num_classes, **{k: getattr(cfg, k) for k in ARCH_KEYS}, bn_momentum=cfg.bn_momentum)


def describe(cfg) -> str:
    """The model's shape in the words of its keys, for error messages."""
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in ARCH_KEYS)
