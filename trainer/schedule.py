"""The learning rate at any point of training: d2l's step decay, cosine or linear decay to 0, with optional warmup.

Positions are fractional epochs (epoch + step / steps_per_epoch), so the schedule depends
only on the position and the config, and resuming at an epoch continues it exactly.
"""
from __future__ import annotations

import math

from trainer.config import TrainConfig


def base_lr(cfg: TrainConfig, world_size: int) -> float:
    """The peak LR actually used: cfg.lr, times the world size when scale_lr is on."""
    return cfg.lr * (world_size if cfg.scale_lr else 1)


def lr_at(cfg: TrainConfig, position: float, world_size: int = 1) -> float:
    """LR at fractional epoch `position` (0 = start of training)."""
    peak = base_lr(cfg, world_size)
    if cfg.warmup_epochs and position < cfg.warmup_epochs:
        # linear from peak/1000 (not 0, so the first step moves) up to peak
        t = max(position, 0.0) / cfg.warmup_epochs
        return peak * (1e-3 + (1 - 1e-3) * t)
    if cfg.schedule in ("cosine", "linear"):
        span = max(cfg.epochs - cfg.warmup_epochs, 1)
        t = min(max(position - cfg.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * peak * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else peak * (1 - t)
    # d2l's: lr * lr_decay ** (epoch // lr_period), constant within an epoch
    return peak * cfg.lr_decay ** (int(position) // cfg.lr_period)


def validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch (0-based) of a cfg.epochs run is validated: the first, every valid_every-th, the last."""
    return epoch == 0 or (epoch + 1) % cfg.valid_every == 0 or epoch == cfg.epochs - 1
