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

from contracts.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "train_valid", "test")
TRAINVAL_IMAGES, TRAINVAL_LABELS, TRAINVAL_IDS = "trainval_images.npy", "trainval_labels.npy", "trainval_ids.npy"
TEST_IMAGES, TEST_IDS = "test_images.npy", "test_ids.npy"
FOLDERS = "train_valid_test"
IMAGE_SHAPE = (32, 32, 3)


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
    """The manifest of a prepared directory; InputError if missing, unreadable or of another format."""
    path = Path(prep_dir) / MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: missing; run `cifar10-hvd prepare --data SRC --out {prep_dir}` first") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise InputError(f"{path}: format_version {found!r}, this code reads {FORMAT_VERSION}; prepare it again")
    return Manifest(manifest)


def _fail(prep_dir: Path, key: str, what: str) -> InputError:
    """The error for a manifest key that does not match the directory (exit 2)."""
    return InputError(f"{Path(prep_dir) / MANIFEST}: key '{key}': {what}; prepare the data again")


def _count(prep_dir: Path, key: str, value: object) -> int:
    """value if it is a non-negative integer (not a bool, not a string), else the error naming key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(prep_dir, key, f"must be a non-negative integer, found {value!r}")
    return value


def _array(prep_dir: Path, files: dict, key: str, name: object) -> np.ndarray:
    """The memory map of a file the manifest lists, its size checked against the manifest's bytes."""
    if not isinstance(name, str) or Path(name).name != name or name not in files:
        raise _fail(prep_dir, key, f"{name!r} is not one of the files listed under 'files'")
    path = prep_dir / name
    expected = files[name].get("bytes") if isinstance(files[name], dict) else None
    try:
        size = path.stat().st_size
        if size != expected:
            raise _fail(prep_dir, f"files.{name}.bytes", f"{path} has {size} bytes, the manifest says {expected!r}")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(prep_dir, key, f"cannot map {path}: {exc}") from None


def _check_entry(prep_dir: Path, manifest: dict, split: str) -> tuple[np.ndarray, range]:
    """One split's arrays against its entry: shapes, dtypes, rows inside them, labels within classes."""
    key = f"splits.{split}"
    entry, files = manifest["splits"].get(split), manifest["files"]
    if not isinstance(entry, dict):
        raise _fail(prep_dir, key, "missing")
    start = _count(prep_dir, f"{key}.start", entry.get("start"))
    rows = range(start, start + _count(prep_dir, f"{key}.count", entry.get("count")))
    images = _array(prep_dir, files, f"{key}.images", entry.get("images"))
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise _fail(prep_dir, f"{key}.images", f"{entry['images']} is {images.dtype} {images.shape}, "
                    f"expected uint8 (N, {', '.join(map(str, IMAGE_SHAPE))})")
    kinds = ("ids",) if split == "test" and entry.get("labels") is None else ("ids", "labels")
    for kind in kinds:
        arr = _array(prep_dir, files, f"{key}.{kind}", entry.get(kind))
        if arr.dtype.kind not in "iu" or arr.shape != (len(images),):
            raise _fail(prep_dir, f"{key}.{kind}", f"{entry[kind]} is {arr.dtype} {arr.shape}, "
                        f"expected integers, one per image ({len(images)})")
        if kind == "labels" and len(rows) and not (0 <= arr[rows.start:rows.stop].min()
                                                   and arr[rows.start:rows.stop].max() < len(manifest["classes"])):
            raise _fail(prep_dir, f"{key}.labels", f"rows {rows.start}..{rows.stop - 1} hold labels outside "
                        f"0..{len(manifest['classes']) - 1} (the classes)")
    if rows.stop > len(images):
        raise _fail(prep_dir, key, f"rows {rows.start}..{rows.stop - 1} lie beyond the {len(images)} rows of "
                    f"{entry['images']}")
    return images, rows


def check(prep_dir: str | Path, manifest: dict) -> None:
    """The manifest against the arrays it maps, without reading images: InputError naming the key.

    Checks the classes, every split's files (sizes as listed, shapes, dtypes), its rows inside the
    arrays, its labels within the classes, and that train, valid and test share no rows.
    """
    prep_dir = Path(prep_dir)
    classes = manifest.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes) \
            or not all(isinstance(c, str) and c for c in classes):
        raise _fail(prep_dir, "classes", f"must list at least 2 distinct names, found {classes!r}")
    for key in ("splits", "files"):
        if not isinstance(manifest.get(key), dict):
            raise _fail(prep_dir, key, "missing or not a mapping")
    used = {split: _check_entry(prep_dir, manifest, split) for split in SPLITS}
    for i, a in enumerate(("train", "valid", "test")):
        for b in ("train", "valid", "test")[i + 1:]:
            rows_a, rows_b = used[a][1], used[b][1]
            same_file = manifest["splits"][a]["images"] == manifest["splits"][b]["images"]
            if same_file and max(rows_a.start, rows_b.start) < min(rows_a.stop, rows_b.stop):
                raise _fail(prep_dir, f"splits.{b}", f"rows {rows_b.start}..{rows_b.stop - 1} overlap "
                            f"splits.{a}'s {rows_a.start}..{rows_a.stop - 1}")


def verify(prep_dir: str | Path) -> list[str]:
    """Re-hash every file against the manifest's sha256 (after check); return the names that differ.

    Run it after copying a prepared directory to new storage: sizes can match while bytes do not.
    """
    manifest = read_manifest(prep_dir)
    check(prep_dir, manifest)
    return [name for name, meta in manifest["files"].items()
            if sha256_file(Path(prep_dir) / name) != (meta or {}).get("sha256")]


def open_split(prep_dir: str | Path, split: str, manifest: dict | None = None) -> Split:
    """The rows of SPLIT: images memory-mapped (a rank reads only its shard), labels and ids loaded.

    The manifest is checked against the arrays first (check); pass the manifest already read
    (read_manifest) to open several splits of one publish without reading it again.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    prep_dir = Path(prep_dir)
    manifest = manifest or read_manifest(prep_dir)
    check(prep_dir, manifest)
    entry = manifest["splits"][split]
    rows = slice(entry["start"], entry["start"] + entry["count"])

    def load(name: str) -> np.ndarray:
        return np.load(prep_dir / name, mmap_mode="r", allow_pickle=False)[rows]

    ids = np.asarray(load(entry["ids"]), dtype=np.int64)
    labels = None if entry["labels"] is None else np.asarray(load(entry["labels"]), dtype=np.int64)
    return Split(load(entry["images"]), labels, ids)
