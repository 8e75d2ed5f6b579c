"""The trainer's sections of the schema: TrainConfig (`train:`) and PredictConfig (`predict:`), d2l's values as defaults.

Precedence is defaults < YAML file < command-line flags. A YAML file is either a
flat mapping of these keys or a full run config (configs/*.yaml) whose `train:`
and `predict:` sections are read here. Reading, validation and flags are
contracts.schema's (re-exported here for existing imports); unknown keys, wrong
types and impossible values raise InputError (contracts.errors.InputError) naming
the key and the file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.schema import (  # noqa: F401 - re-exported: trainer and launcher callers import them from here
    RUN_CONFIG_KEYS,
    RUN_CONFIG_SCALARS,
    RUN_CONFIG_SECTIONS,
    InputError,
    add_flags,
    apply_aliases,
    check_value,
    from_mapping,
    read_yaml,
    resolve,
    section,
)

# the views a validation or a prediction may average (trainer.inference.combine_views)
TTA_VIEWS = ("none", "flip", "flip-translate")

# "seed" is accepted for "d2l": configs, overrides and run records that spell it so keep working
D2L_ALIAS = {"seed": "d2l"}


@dataclass
class TrainConfig:
    """Training hyperparameters. Defaults are the d2l chapter's (Dive into Deep Learning's Kaggle CIFAR-10,
    kaggle_cifar10.md); "d2l" names its augmentation and its per-image pipeline ("seed" is accepted for it)."""

    width: int = field(default=64, metadata={"help": "channels of the first stage (64 = ResNet-18); all stages scale with it", "min": 1})
    stage_mult: str = field(default="1,2,4,8", metadata={
        "help": "channels of the four stages as multiples of width: d2l's 1,2,4,8; e.g. 1,2,4,16 doubles the last "
                "stage (depth, stem and blocks unchanged; the first stays 1, its identity shortcuts take the stem's channels)",
        "pattern": r"1(,[1-9][0-9]?){3}", "pattern_help": "four comma-separated multiples of width, the first 1 (e.g. 1,2,4,8)"})
    stem_stride: int = field(default=1, metadata={
        "help": "stride of the stem conv: d2l's 1 keeps the stages at 32, 16, 8, 4 pixels; 2 runs them at 16, 8, 4, 2",
        "choices": (1, 2), "added_later": True})
    stem_pool: int = field(default=0, metadata={
        "help": "a stride-2 max-pool after the stem's ReLU: d2l's 0 has none; 2 = 2x2 (airbench's), 3 = 3x3 padded by 1 "
                "(ImageNet ResNet-18's); with stem_stride 1 the stages then run at 16, 8, 4, 2 pixels",
        "choices": (0, 2, 3), "added_later": True})
    stem_init: str = field(default="xavier", metadata={
        "help": "the stem conv's filters: d2l's Xavier init, trained; or whiten = the training images' 3x3 patch-"
                "whitening directions (the top width/2 eigenvectors of the patch covariance over 1/sqrt(eigenvalue), "
                "each with its negation), frozen (airbench's first layer)",
        "choices": ("xavier", "whiten"), "added_later": True})
    bn_momentum: float = field(default=0.9, metadata={
        "help": "BatchNorm running-statistics momentum, gluon's form (running = m running + (1 - m) batch): d2l's 0.9; "
                "airbench's 0.6 in PyTorch's form is 0.4 here (statistics that follow the last steps of a short run)",
        "min": 0.0, "max_excl": 1.0, "added_later": True})
    epochs: int = field(default=100, metadata={"help": "epochs per phase", "min": 1})
    time_budget: float = field(default=0.0, metadata={
        "help": "seconds the phase's epochs may take (0 = off): after the first epoch, rank 0 picks the most epochs, "
                "at most `epochs`, that fit (low_res_epochs in proportion); the record and a resume keep that count",
        "min": 0.0, "added_later": True})
    batch_size: int = field(default=128, metadata={"help": "per-rank batch size; the global batch is this times the world size", "min": 1})
    lr: float = field(default=0.1, metadata={"help": "base learning rate", "min": 0.0})
    lr_period: int = field(default=50, metadata={"help": "step schedule: multiply the LR by lr_decay every lr_period epochs", "min": 1})
    lr_decay: float = field(default=0.1, metadata={"help": "step schedule factor", "min": 0.0})
    wd: float = field(default=5e-4, metadata={"help": "SGD weight decay", "min": 0.0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0.0})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and augmentation", "min": 0})
    schedule: str = field(default="step", metadata={"help": "LR schedule after warmup: d2l's step decay, or cosine or linear decay to 0 at the last epoch", "choices": ("step", "cosine", "linear")})
    warmup_epochs: int = field(default=0, metadata={"help": "linear LR warmup epochs (0 = off)", "min": 0})
    scale_lr: bool = field(default=False, metadata={"help": "multiply lr by the world size (linear scaling rule)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing epsilon (0 = off)", "min": 0.0, "max_excl": 1.0})
    amp: str = field(default="none", metadata={"help": "mixed precision: float16 (GPU only) or bfloat16 (CPU only); the other device is refused at start-up", "choices": ("none", "float16", "bfloat16")})
    compression: str = field(default="none", metadata={"help": "gradient allreduce compression: fp16 halves the bytes on the wire (for slow networks)", "choices": ("none", "fp16")})
    pipeline: str = field(default="batched", metadata={"help": "input pipeline: batched numpy augmentation, or d2l's per-image DataLoader", "choices": ("batched", "d2l"), "aliases": D2L_ALIAS})
    eval_crop: int = field(default=0, metadata={"help": "evaluation/predict view: 0 = d2l's (normalize only); S in 32..40 = centre SxS crop of the 40x40 upscale, resized to 32 (the zoom training crops show)", "choices": (0, *range(32, 41))})
    eval_batch_size: int = field(default=512, metadata={"help": "per-rank batch size for validation", "min": 1})
    valid_every: int = field(default=1, metadata={"help": "validate the first epoch, every Nth and the last (1: every epoch, as d2l)", "min": 1})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept in RUN/checkpoints", "min": 1})
    threads: int = field(default=0, metadata={"help": "OMP threads per rank (0 = cores / ranks on this host)", "min": 0})
    # recipe ingredients for short schedules; each default is d2l's behaviour
    augment: str = field(default="d2l", metadata={"help": "training augmentation: d2l's resized crop + flip, or padcrop = translate by up to `pad` pixels (pad, random 32x32 crop) + flip", "choices": ("d2l", "padcrop"), "aliases": D2L_ALIAS})
    flip: str = field(default="random", metadata={
        "help": "padcrop's mirroring: each image mirrored with probability 1/2 every epoch, or alternate = a random "
                "half in the first epoch, then each image the other way from its previous epoch (airbench)",
        "choices": ("random", "alternate"), "added_later": True})
    pad: int = field(default=4, metadata={"help": "padcrop: pixels of padding per side", "choices": tuple(range(1, 17))})
    pad_mode: str = field(default="reflect", metadata={"help": "padcrop: padding by reflection, or with black (zero) pixels", "choices": ("reflect", "zero")})
    cutout: int = field(default=0, metadata={"help": "cutout: zero a random SxS square inside each training image (0 = off)", "choices": tuple(range(0, 33))})
    ema: float = field(default=0.0, metadata={"help": "exponential moving average of the weights, decay per step (0 = off); validation, checkpoints' .ema and the final model use the average", "min": 0.0, "max_excl": 1.0})
    zero_init_residual: bool = field(default=False, metadata={"help": "initialise each residual block's last BatchNorm gamma to 0 (the block starts as an identity)"})
    wd_bn_bias: bool = field(default=True, metadata={"help": "weight decay on BatchNorm gamma/beta and biases too, as d2l (false: on conv and dense weights only)"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum (trainer.recipe.NesterovSGD) instead of d2l's sgd"})
    tta: str = field(default="none", metadata={"help": "validation view, as predict --tta: flip = the image's and its mirror's logits summed, flip-translate = that pair and the pairs moved one pixel up-left and down-right (the plain view's accuracy is recorded beside it)", "choices": TTA_VIEWS})
    low_res: int = field(default=0, metadata={"help": "progressive resizing: the first low_res_epochs epochs train on batches downscaled to low_res x low_res (area average; 0 = off, d2l's 32)", "choices": (0, *range(8, 32))})
    low_res_epochs: int = field(default=0, metadata={"help": "progressive resizing: epochs at low_res before training at 32x32", "min": 0})

    def __post_init__(self) -> None:
        apply_aliases(self)  # TrainConfig(pipeline="seed") in code holds "d2l" too, as a YAML key would


CHANGE_KEYS = {"epoch", "key", "old", "new"}
# keys that decide how a run is carried out, not what it computes: a resume may change them freely
OPERATIONAL_KEYS = ("threads", "keep_checkpoints", "eval_batch_size", "valid_every")
DECAY_TO_END = ("cosine", "linear")  # schedules whose LR at an epoch depends on `epochs`


def resume_changes(old: TrainConfig, old_world: int, new: TrainConfig, new_world: int) -> list[dict]:
    """What continuing a run trained under (old, old_world ranks) as (new, new_world) changes in its training:
    [{key, old, new}], sorted by key.

    The global batch stands for batch_size and the world size (other ranks with the same global batch change
    nothing), and the LR the run uses (lr, times the ranks with scale_lr) for lr and scale_lr. epochs counts
    only where the schedule decays to the last epoch (cosine, linear): a step schedule is extended freely.
    """
    from trainer.schedule import base_lr

    found = {"global_batch": (old.batch_size * old_world, new.batch_size * new_world),
             "lr": (base_lr(old, old_world), base_lr(new, new_world))}
    skip = {"batch_size", "lr", "scale_lr", *OPERATIONAL_KEYS}
    if old.schedule not in DECAY_TO_END and new.schedule not in DECAY_TO_END:
        skip.add("epochs")
    found.update({f.name: (getattr(old, f.name), getattr(new, f.name))
                  for f in dataclasses.fields(TrainConfig) if f.name not in skip})
    return [{"key": k, "old": a, "new": b} for k, (a, b) in sorted(found.items()) if a != b]


RUN_RECORD_VERSION = 1  # RUN/config.json's format_version; a file without one is read as version 1


@dataclass
class RunRecord:
    """RUN/config.json: the run's TrainConfig and classes, and what it ran on (to reproduce it and predict with it)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    classes: list[str] = field(default_factory=list)
    phase: str = field(default="tune", metadata={"choices": ("tune", "final")})
    prepared: str = ""
    world_size: int = field(default=1, metadata={"min": 1})
    global_batch: int = field(default=0, metadata={"min": 0})
    lr: float = 0.0
    threads_per_rank: int = field(default=0, metadata={"min": 0})
    versions: dict[str, str] = field(default_factory=dict)
    # what a resume with --resume-with-changes changed: [{epoch, key, old, new}], the epoch the new value began
    changes: list[dict] = field(default_factory=list)
    format_version: int = field(default=RUN_RECORD_VERSION, metadata={"choices": (RUN_RECORD_VERSION,)})

    def to_json(self) -> str:
        """The record as config.json's text."""
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"


def run_record(data: Any, source: str) -> RunRecord:
    """Validate config.json's parsed JSON into a RunRecord; InputError names the key and source."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}")
    rest = dict(data)
    train = from_mapping(TrainConfig, rest.pop("train", {}), f"{source} (train)")
    classes = rest.pop("classes", None)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise InputError(f"{source}: key 'classes' must be a non-empty list of class names, got {classes!r}")
    versions = rest.pop("versions", {})
    if not isinstance(versions, dict):
        raise InputError(f"{source}: key 'versions' must be a mapping, got {versions!r}")
    changes = rest.pop("changes", [])
    if not isinstance(changes, list) or not all(isinstance(c, dict) and set(c) == CHANGE_KEYS for c in changes):
        raise InputError(f"{source}: key 'changes' must be a list of {{epoch, key, old, new}} entries")
    return from_mapping(RunRecord, rest, source,
                        RunRecord(train=train, classes=classes, versions=versions, changes=changes))


def read_run_record(run_dir: str | Path) -> RunRecord:
    """RUN/config.json read back through the schema (InputError if missing or not JSON)."""
    from trainer.rundir import RUN_CONFIG, read_run_config

    return run_record(read_run_config(run_dir), str(Path(run_dir) / RUN_CONFIG))
