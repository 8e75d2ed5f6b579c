"""The one config object: every training and prediction hyperparameter, seed values as defaults.

Precedence is defaults < YAML file < command-line flags. A YAML file is either a
flat mapping of these keys or a full run config (configs/*.yaml) whose `train:`
and `predict:` sections are read here; the launcher validates the other sections.
Unknown keys, wrong types and impossible values raise ConfigError naming the key
and the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names it."""


@dataclass
class TrainConfig:
    """Training hyperparameters. Defaults are the d2l seed's (kaggle_cifar10.md)."""

    width: int = field(default=64, metadata={"help": "channels of the first stage (64 = ResNet-18); all stages scale with it", "min": 1})
    epochs: int = field(default=100, metadata={"help": "epochs per phase", "min": 0})
    batch_size: int = field(default=128, metadata={"help": "per-rank batch size; the global batch is this times the world size", "min": 1})
    lr: float = field(default=0.1, metadata={"help": "base learning rate", "min": 0.0})
    lr_period: int = field(default=50, metadata={"help": "step schedule: multiply the LR by lr_decay every lr_period epochs", "min": 1})
    lr_decay: float = field(default=0.1, metadata={"help": "step schedule factor", "min": 0.0})
    wd: float = field(default=5e-4, metadata={"help": "SGD weight decay", "min": 0.0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0.0})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and augmentation", "min": 0})
    schedule: str = field(default="step", metadata={"help": "LR schedule", "choices": ("step", "cosine")})
    warmup_epochs: int = field(default=0, metadata={"help": "linear LR warmup epochs (0 = off)", "min": 0})
    scale_lr: bool = field(default=False, metadata={"help": "multiply lr by the world size (linear scaling rule)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing epsilon (0 = off)", "min": 0.0, "max_excl": 1.0})
    amp: str = field(default="none", metadata={"help": "mixed precision: float16 (GPU) or bfloat16 (CPU)", "choices": ("none", "float16", "bfloat16")})
    pipeline: str = field(default="batched", metadata={"help": "input pipeline: batched numpy augmentation, or the seed's per-image DataLoader", "choices": ("batched", "seed")})
    eval_crop: int = field(default=0, metadata={"help": "evaluation/predict view: 0 = the seed's (normalize only); S in 32..40 = centre SxS crop of the 40x40 upscale, resized to 32 (the zoom training crops show)", "choices": (0, *range(32, 41))})
    eval_batch_size: int = field(default=512, metadata={"help": "per-rank batch size for validation", "min": 1})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept in RUN/checkpoints", "min": 1})
    threads: int = field(default=0, metadata={"help": "OMP threads per rank (0 = cores / ranks on this host)", "min": 0})


@dataclass
class PredictConfig:
    """Inference options for trainer.predict."""

    batch_size: int = field(default=512, metadata={"help": "per-rank inference batch size", "min": 1})
    tta: str = field(default="none", metadata={"help": "test-time augmentation", "choices": ("none", "flip")})
    precision: str = field(default="float32", metadata={"help": "int8: MKLDNN-quantized CPU inference, calibrated on 512 training images (benchmarks/bench_predict.py gate)", "choices": ("float32", "int8")})


def _check_value(cls: type, name: str, value: Any, source: str) -> Any:
    """Return value coerced to the field's type, or raise ConfigError naming name and source."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{name}' (known keys: {known})")
    f = fields[name]
    typ = typing.get_type_hints(cls)[name]
    meta = f.metadata
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{name}' must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{name}' must be an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{source}: key '{name}' must be a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{name}' must be a string, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{source}: key '{name}' must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{source}: key '{name}' must be >= {meta['min']}, got {value!r}")
    if "min_excl" in meta and value <= meta["min_excl"]:
        raise ConfigError(f"{source}: key '{name}' must be > {meta['min_excl']}, got {value!r}")
    if "max_excl" in meta and value >= meta["max_excl"]:
        raise ConfigError(f"{source}: key '{name}' must be < {meta['max_excl']}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Mapping[str, Any], source: str, base: Any = None) -> Any:
    """Build (or update a copy of base) a config dataclass from a mapping, validating every key."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(mapping).__name__}")
    obj = dataclasses.replace(base) if base is not None else cls()
    for key, value in mapping.items():
        setattr(obj, str(key), _check_value(cls, str(key), value, source))
    return obj


def read_yaml(path: str | Path) -> dict:
    """Load a YAML file with safe_load; an empty file is an empty mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# the top-level keys of a run config (launcher.run_config); a file with any of them is one
RUN_CONFIG_SCALARS = ("data", "prepared", "workdir")
RUN_CONFIG_SECTIONS = ("prepare", "train", "predict", "launch")
RUN_CONFIG_KEYS = (*RUN_CONFIG_SCALARS, "phases", *RUN_CONFIG_SECTIONS)


def section(data: dict, name: str, path: str | Path) -> dict:
    """The keys for cls in a YAML document: its `name:` section in a run config, else the whole mapping."""
    if not any(k in data for k in RUN_CONFIG_KEYS):
        return data
    sub = data.get(name) or {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{path}: section '{name}' must be a mapping")
    return sub


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add a --flag-name for every field of cls; defaults are None so only given flags override."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        helptext = f"{f.metadata.get('help', '')} (default: {f.default})"
        dest = prefix.replace("-", "_") + f.name
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=hints[f.name], default=None,
                                choices=f.metadata.get("choices"), help=helptext)


def resolve(cls: type, args: argparse.Namespace, config_path: str | None, section_name: str, prefix: str = "") -> Any:
    """Defaults, then the YAML file's section, then the flags that were given."""
    cfg = cls()
    if config_path:
        data = read_yaml(config_path)
        cfg = from_mapping(cls, section(data, section_name, config_path), f"{config_path} ({section_name})", cfg)
    given = {f.name: getattr(args, prefix.replace("-", "_") + f.name) for f in dataclasses.fields(cls)}
    given = {k: v for k, v in given.items() if v is not None}
    return from_mapping(cls, given, "command line", cfg)
