"""data_prep: validate the Kaggle CIFAR-10 download and publish it once, packed, for every rank to read.

Public API: prepare(src, out, PrepareConfig(...)) -> Manifest, open_split(prep_dir, split) -> Split, read_manifest(prep_dir).
"""
from contracts.errors import InputError
from data_prep.config import PrepareConfig
from data_prep.preparation import prepare
from data_prep.store import SPLITS, Manifest, Split, open_split, read_manifest

__all__ = ["SPLITS", "InputError", "Manifest", "PrepareConfig", "Split", "open_split", "prepare", "read_manifest"]
