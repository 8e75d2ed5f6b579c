"""The d2l chapter's train/valid rule, made independent of directory order.

n = size of the smallest class, r = valid ratio: max(1, floor(n * r)) images of every class go to
`valid`, the rest to `train`. Which ones is chosen per class by a shuffle seeded by `seed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_prep.config import PrepareConfig


@dataclass(frozen=True)
class Assignment:
    """Classes (sorted), images per class held out, and the (id, label index) rows of each split."""

    classes: list[str]
    n_valid_per_label: int
    valid: list[tuple[int, int]]  # ascending id
    train: list[tuple[int, int]]  # ascending id


def n_valid_per_label(class_sizes: list[int], valid_ratio: float) -> int:
    """d2l's count: max(1, floor(smallest class size * ratio))."""
    return max(1, math.floor(min(class_sizes) * valid_ratio))


def assign(labels: dict[int, str], cfg: PrepareConfig) -> Assignment:
    """Split labelled ids into valid and train per d2l's rule (cfg.valid_ratio, cfg.seed), deterministically."""
    classes = sorted(set(labels.values()))
    by_class: dict[str, list[int]] = {name: [] for name in classes}
    for image_id in sorted(labels):
        by_class[labels[image_id]].append(image_id)
    k = n_valid_per_label([len(ids) for ids in by_class.values()], cfg.valid_ratio)
    valid: list[tuple[int, int]] = []
    train: list[tuple[int, int]] = []
    for index, name in enumerate(classes):
        ids = np.asarray(by_class[name], dtype=np.int64)
        # One generator per class, keyed by (seed, class index): a class's choice does not depend on others.
        order = np.random.default_rng((cfg.seed, index)).permutation(len(ids))
        chosen = set(ids[order[:k]].tolist())
        valid += [(i, index) for i in ids.tolist() if i in chosen]
        train += [(i, index) for i in ids.tolist() if i not in chosen]
    valid.sort()
    train.sort()
    return Assignment(classes, k, valid, train)
