"""The prepared directory's format: manifest.json plus packed .npy arrays, and how to read a split.

Rows of `train_valid` are the valid rows then the train rows (each ascending by id), so `valid`
and `train` are contiguous slices of one file and every split opens as a memory map.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_prep.errors import PrepareError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "train_valid", "test")
TRAINVAL_IMAGES, TRAINVAL_LABELS, TRAINVAL_IDS = "trainval_images.npy", "trainval_labels.npy", "trainval_ids.npy"
TEST_IMAGES, TEST_IDS = "test_images.npy", "test_ids.npy"
FOLDERS = "train_valid_test"


class Split(NamedTuple):
    """One split: uint8 images N x 32 x 32 x 3 (memory-mapped), int64 labels (None for test), int64 ids."""

    images: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray


def split_table(n_valid: int, n_train: int, n_test: int) -> dict[str, dict]:
    """Where each split's rows live: files and the first row."""
    trainval = {"images": TRAINVAL_IMAGES, "labels": TRAINVAL_LABELS, "ids": TRAINVAL_IDS}
    return {
        "train": {**trainval, "start": n_valid, "count": n_train},
        "valid": {**trainval, "start": 0, "count": n_valid},
        "train_valid": {**trainval, "start": 0, "count": n_valid + n_train},
        "test": {"images": TEST_IMAGES, "labels": None, "ids": TEST_IDS, "start": 0, "count": n_test},
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(prep_dir: Path, manifest: dict) -> None:
    """Write manifest.json (the last file written: its presence marks a complete directory)."""
    with open(prep_dir / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


class Manifest(dict):
    """A prepared directory's manifest.json: the dict as written, with typed views of what callers read."""

    @property
    def classes(self) -> list[str]:
        return list(self["classes"])

    def count(self, split: str) -> int:
        """Rows in split (train, valid, train_valid or test)."""
        return int(self["splits"][split]["count"])

    def figures(self) -> dict:
        """The launcher's summary.json figures for the prepare stage: images decoded and each split's rows."""
        return {"images": self.count("train_valid") + self.count("test"), "train": self.count("train"),
                "valid": self.count("valid"), "test": self.count("test")}


def read_manifest(prep_dir: str | Path) -> Manifest:
    """The manifest of a prepared directory; PrepareError if missing, unreadable or of another format."""
    path = Path(prep_dir) / MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"{path}: missing; run `cifar10-hvd prepare --data SRC --out {prep_dir}` first") from None
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise PrepareError(f"{path}: format_version {found!r}, this code reads {FORMAT_VERSION}; prepare it again")
    return Manifest(manifest)


def open_split(prep_dir: str | Path, split: str, manifest: dict | None = None) -> Split:
    """The rows of SPLIT: images memory-mapped (a rank reads only its shard), labels and ids loaded.

    Pass the manifest already read (read_manifest) to open several splits of one publish without
    reading it again.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    prep_dir = Path(prep_dir)
    entry = (manifest or read_manifest(prep_dir))["splits"][split]
    rows = slice(entry["start"], entry["start"] + entry["count"])

    def load(name: str) -> np.ndarray:
        return np.load(prep_dir / name, mmap_mode="r", allow_pickle=False)[rows]

    ids = np.asarray(load(entry["ids"]), dtype=np.int64)
    labels = None if entry["labels"] is None else np.asarray(load(entry["labels"]), dtype=np.int64)
    return Split(load(entry["images"]), labels, ids)
