"""train.time_budget: the seconds a phase's epochs may take (0 = off); the count of epochs is fitted to them once.

A fresh run trains its first epoch; then rank 0 takes the largest count of epochs, at most `epochs`, whose
cost fits what is left of the budget, scales low_res_epochs in proportion, and every rank trains that run.
A 32x32 epoch is costed at `ratio` times the first, low-resolution one: what a 32x32 training step was timed
to cost in low_res ones before the first epoch (the arithmetic's ratio, (32/low_res)^2, is no guide: 24x24
epochs ran 1.65 times as fast as 32x32 ones on one 2-core machine, 1.95 on another). The first epoch's learning
rate must not depend on the count (check_recipe asks for a warmup under a schedule that decays to the last
epoch), so the run the first epoch began is the run that continues. Checkpoints and config.json record the
count; a resume keeps it. Start-up, the step timing included, is not counted.
"""
from __future__ import annotations

import dataclasses

from trainer.config import TrainConfig


def low_res_share(cfg: TrainConfig, epochs: int) -> int:
    """low_res_epochs for a run of `epochs`, in cfg's proportion: at least one where cfg has any (the first
    epoch, already trained, was one)."""
    if not cfg.low_res_epochs:
        return 0
    return min(epochs, max(1, round(cfg.low_res_epochs * epochs / cfg.epochs)))


def least_epochs(cfg: TrainConfig) -> int:
    """The shortest run a budget may pick: the warmup and one epoch after it (a run that never decays is no run)."""
    return min(cfg.epochs, cfg.warmup_epochs + 1)


def cost(cfg: TrainConfig, epochs: int, first_s: float, ratio: float) -> float:
    """The seconds of epochs 2..`epochs`, from the first epoch's first_s and a 32x32 epoch's cost in
    low-resolution ones."""
    low = low_res_share(cfg, epochs)
    if not low:
        return (epochs - 1) * first_s
    return (low - 1) * first_s + (epochs - low) * first_s * ratio


def fitted(cfg: TrainConfig, first_s: float, ratio: float = 1.0) -> int:
    """The count of epochs for cfg's budget, given that the first took first_s seconds and a 32x32 epoch
    costs `ratio` low-resolution ones."""
    left = cfg.time_budget - first_s
    fits = [n for n in range(least_epochs(cfg), cfg.epochs + 1) if cost(cfg, n, first_s, ratio) <= left]
    return max(fits, default=least_epochs(cfg))


def with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """cfg as a run of `epochs` epochs, its low-resolution ones in proportion."""
    return dataclasses.replace(cfg, epochs=epochs, low_res_epochs=low_res_share(cfg, epochs))


def kept(cfg: TrainConfig, old: TrainConfig) -> TrainConfig:
    """cfg for continuing a checkpoint trained as old: a run under the same budget keeps the count it decided."""
    if cfg.time_budget and old.time_budget == cfg.time_budget and old.epochs <= cfg.epochs:
        return with_epochs(cfg, old.epochs)
    return cfg
