"""PrepareConfig: the `prepare:` section of a run config and the options of `cifar10-hvd prepare`."""
from __future__ import annotations

from dataclasses import dataclass, field

from contracts.labels import CIFAR10_CLASSES, parse_classes

# one class name: no comma, path separator or control character, not only whitespace (linear to match)
_CLASS_NAME = r"[^\S\x00-\x1f]*[^,/\\\x00-\x1f\s][^,/\\\x00-\x1f]*"


@dataclass
class PrepareConfig:
    """How the download is split and decoded. Defaults are the d2l chapter's (valid ratio 0.1).

    The schema (contracts.schema) validates every field as it is set from a YAML key, an override or a
    flag; prepare() trusts an instance built that way and checks nothing again.
    """

    valid_ratio: float = field(default=0.1, metadata={
        "help": "held-out share: max(1, floor(smallest class * ratio)) images per class", "min": 0.0, "max_excl": 1.0})
    seed: int = field(default=0, metadata={"help": "seed of the per-class shuffle choosing valid images", "min": 0})
    workers: int = field(default=0, metadata={"help": "decode processes (0 = all cores this process may use)", "min": 0})
    layout: str = field(default="packed", metadata={
        "help": "folders: also write d2l's train_valid_test/ class folders (hard links) inside PREP",
        "choices": ("packed", "folders")})
    classes: str = field(default=",".join(CIFAR10_CLASSES), metadata={
        "help": "the classes trainLabels.csv must hold, each with training images, comma-separated "
                "(the manifest lists them sorted)",
        "pattern": rf"{_CLASS_NAME}(?:,{_CLASS_NAME})*",
        "pattern_help": "class names separated by commas (none empty, no '/', '\\' or control characters)",
        # what a pattern cannot say: a repeated name, a name no folder can have, fewer than 2
        "check_named": parse_classes})

    def class_names(self) -> list[str]:
        """The classes stripped and sorted, as the manifest lists them."""
        return sorted(name.strip() for name in self.classes.split(","))
