"""The evaluation view: eval_crop 0 is d2l's transform; eval_crop S matches MXNet's resize + centre crop."""
from __future__ import annotations

import numpy as np
import pytest

from contracts.errors import InputError
from trainer.config import TrainConfig, from_mapping
from trainer.presets import MEAN, STD, eval_transform, normalize


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def test_crop_zero_is_the_d2l_transform(images):
    assert np.array_equal(eval_transform(images, 0), normalize(images))


@pytest.mark.parametrize("side", [32, 36, 40])
def test_crop_matches_mxnet_resize_and_centre_crop(images, side):
    import mxnet as mx

    got = eval_transform(images, side)
    for i, img in enumerate(images):
        big = mx.image.imresize(mx.nd.array(img, dtype="uint8"), 40, 40, interp=1)
        off = (40 - side) // 2
        ref = mx.image.fixed_crop(big, off, off, side, side, size=(32, 32), interp=1).asnumpy().astype(np.float32)
        ref = ((ref / 255.0 - MEAN) / STD).transpose(2, 0, 1)
        # MXNet rounds the 40x40 intermediate to uint8; this path keeps it in float
        assert np.abs(got[i] - ref).max() * 255 * STD.min() < 2.0


def test_crop_changes_the_view(images):
    assert np.abs(eval_transform(images, 36) - normalize(images)).mean() > 0.1


def test_eval_crop_is_validated():
    assert from_mapping(TrainConfig, {"eval_crop": 36}, "x").eval_crop == 36
    with pytest.raises(InputError, match="key 'eval_crop' must be one of"):
        from_mapping(TrainConfig, {"eval_crop": 20}, "cfg.yaml")
