"""train.time_budget: the seconds a phase's epochs may take (0 = off); the count of epochs is fitted to them once.

A fresh run times its steps and trains its first epoch; then rank 0 takes the largest count of epochs, at most
`epochs`, whose cost fits what is left of the budget, scales low_res_epochs in proportion, and every rank trains
that run. Every later epoch is costed at the first, low-resolution one's seconds, a 32x32 one plus `extra_s`: its
training pass grown by what a 32x32 step was timed to cost in low_res ones before the first epoch, while the rest
of the epoch (validation, BatchNorm statistics) stays at its measured seconds, less the validation's in an epoch
that valid_every leaves unvalidated. On one 2-core machine the timed ratio applied to whole tune epochs overstated
their 32x32 ones by a fifth, and a timed difference of seconds per step understated them by 12% (augmentation and
memory traffic grow with the pixels as well); the arithmetic's (32/low_res)^2 understated them on another machine.
The first epoch's learning rate must not depend on the count (check_recipe asks for a warmup under a schedule that
decays to the last epoch), so the run the first epoch began is the run that continues. Checkpoints and config.json
record the count; a resume keeps it. The budget counts from the step timing on; start-up before it (loading the
data, building the model) is not counted, nor can a machine that slows down after the first epoch be foreseen: a
budget leaves room for that.
"""
from __future__ import annotations

import dataclasses

from trainer.config import TrainConfig
from trainer.schedule import validates


def low_res_share(cfg: TrainConfig, epochs: int) -> int:
    """low_res_epochs for a run of `epochs`, in cfg's proportion: at least one where cfg has any (the first
    epoch, already trained, was one)."""
    if not cfg.low_res_epochs:
        return 0
    return min(epochs, max(1, round(cfg.low_res_epochs * epochs / cfg.epochs)))


def least_epochs(cfg: TrainConfig) -> int:
    """The shortest run a budget may pick: the warmup and one epoch after it (a run that never decays is no run)."""
    return min(cfg.epochs, cfg.warmup_epochs + 1)


def cost(cfg: TrainConfig, epochs: int, first_s: float, extra_s: float, valid_s: float = 0.0) -> float:
    """The seconds of epochs 2..`epochs`: each the first epoch's first_s, a 32x32 one extra_s more, one that is
    not validated (trainer.schedule.validates) the first's validation seconds valid_s less."""
    low = low_res_share(cfg, epochs)
    run = with_epochs(cfg, epochs)
    skipped = sum(not validates(run, e) for e in range(1, epochs))
    return (epochs - 1) * first_s - skipped * valid_s + ((epochs - low) * extra_s if low else 0.0)


def fitted(cfg: TrainConfig, first_s: float, extra_s: float, spent: float, valid_s: float = 0.0) -> int:
    """The count of epochs for cfg's budget, given that the first took first_s seconds (valid_s of them
    validating), a 32x32 epoch takes extra_s more, and `spent` seconds of the budget are gone (the first
    epoch's among them)."""
    left = cfg.time_budget - spent
    fits = [n for n in range(least_epochs(cfg), cfg.epochs + 1) if cost(cfg, n, first_s, extra_s, valid_s) <= left]
    return max(fits, default=least_epochs(cfg))


def with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """cfg as a run of `epochs` epochs, its low-resolution ones in proportion."""
    return dataclasses.replace(cfg, epochs=epochs, low_res_epochs=low_res_share(cfg, epochs))


def kept(cfg: TrainConfig, old: TrainConfig) -> TrainConfig:
    """cfg for continuing a checkpoint trained as old: a run under the same budget keeps the count it decided."""
    if cfg.time_budget and old.time_budget == cfg.time_budget and old.epochs <= cfg.epochs:
        return with_epochs(cfg, old.epochs)
    return cfg
