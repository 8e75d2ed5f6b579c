"""PrepareConfig: the `prepare:` section of a run config and the options of `cifar10-hvd prepare`."""
from __future__ import annotations

from dataclasses import dataclass, field

from contracts.labels import CIFAR10_CLASSES

# one class name: no comma, path separator or control character, not only whitespace (linear to match)
_CLASS_NAME = r"[^\S\x00-\x1f]*[^,/\\\x00-\x1f\s][^,/\\\x00-\x1f]*"


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
    classes: str = field(default=",".join(CIFAR10_CLASSES), metadata={
        "help": "the classes trainLabels.csv must hold, each with training images, comma-separated "
                "(the manifest lists them sorted)",
        "pattern": rf"{_CLASS_NAME}(?:,{_CLASS_NAME})*",
        "pattern_help": "class names separated by commas (none empty, no '/', '\\' or control characters)"})
