"""PrepareConfig: the `prepare:` section of a run config and the options of `cifar10-hvd prepare`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrepareConfig:
    """How the download is split and decoded. Defaults are the seed's (valid ratio 0.1)."""

    valid_ratio: float = field(default=0.1, metadata={
        "help": "held-out share: max(1, floor(smallest class * ratio)) images per class", "min": 0.0, "max_excl": 1.0})
    seed: int = field(default=0, metadata={"help": "seed of the per-class shuffle choosing valid images", "min": 0})
    workers: int = field(default=0, metadata={"help": "decode processes (0 = all cores this process may use)", "min": 0})
    layout: str = field(default="packed", metadata={
        "help": "folders: also write the seed's train_valid_test/ class folders (hard links) inside PREP",
        "choices": ("packed", "folders")})
