"""Which images each rank trains on in an epoch, and which slice of an eval split it scores.

Training: one permutation per (seed, epoch), the same on every rank; rank r takes every
size-th block of batch_size rows in it, so all ranks run the same number of steps, no
image is seen twice in an epoch, and the remainder is dropped (last_batch='discard').
Evaluation: contiguous slices covering every row exactly once (nothing dropped).
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffle of range(n), identical wherever it is computed."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int, size: int) -> int:
    """Steps every rank runs: full global batches only."""
    return n // (batch_size * size)


def train_shard(n: int, batch_size: int, rank: int, size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) row indices for rank's batches this epoch."""
    steps = steps_per_epoch(n, batch_size, size)
    perm = epoch_permutation(n, seed, epoch)[: steps * size * batch_size]
    # step s of rank r uses global-batch s, block r: ranks interleave over the permutation
    return perm.reshape(steps, size, batch_size)[:, rank]


def eval_slice(n: int, rank: int, size: int) -> slice:
    """Rank's contiguous part of n eval rows; the parts tile range(n) exactly."""
    return slice(rank * n // size, (rank + 1) * n // size)
