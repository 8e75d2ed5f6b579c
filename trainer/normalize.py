"""The seed's evaluation transform (ToTensor + Normalize), batched on uint8 NHWC arrays."""
from __future__ import annotations

import numpy as np

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)
# ToTensor divides by 255, then Normalize: (x/255 - mean)/std == x*scale + shift.
_SCALE = (1.0 / (255.0 * STD)).astype(np.float32)
_SHIFT = (-MEAN / STD).astype(np.float32)


def normalize(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalized with the seed's mean and std."""
    n, h, w, c = images.shape
    if out is None:
        out = np.empty((n, c, h, w), dtype=np.float32)
    for ch in range(c):
        np.multiply(images[..., ch], _SCALE[ch], out=out[:, ch], casting="unsafe")
        out[:, ch] += _SHIFT[ch]
    return out
