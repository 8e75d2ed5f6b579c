"""Find the competition data in SRC (folders, train.7z/test.7z, or the competition zip) and fingerprint it.

The fingerprint is cheap on purpose (names, sizes and mtimes; an archive's size and mtime), so that
re-running `prepare` on unchanged data answers "up to date" without reading a single image.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import archive
from data_prep.errors import PrepareError, offenders

LABELS_CSV = "trainLabels.csv"


@dataclass(frozen=True)
class SourceTree:
    """The competition files as plain folders, ready to read."""

    labels_csv: Path
    train_dir: Path
    test_dir: Path | None


@dataclass
class Source:
    """SRC as given: its kind, its folders' names and its fingerprint; `materialize` gives a SourceTree.

    The fingerprint (a stat of every file) is computed in a thread: a fresh build needs it only for
    the manifest, so it overlaps the decoding instead of delaying it.
    """

    path: Path
    kind: str  # "folders", "7z" or "zip"
    pending_fingerprint: Future[str]
    listings: dict[Path, list[str]] = field(default_factory=dict)  # folder -> file names

    @property
    def fingerprint(self) -> str:
        """sha256 over names, sizes and mtimes (folders) or size and mtime (archives)."""
        return self.pending_fingerprint.result()

    def materialize(self, scratch: Path) -> SourceTree:
        """Folders as they are; archives unpacked (checked first) under SCRATCH."""
        root = self.path
        if self.kind == "zip":
            archive.extract(self.path, scratch / "zip")
            root = _zip_root(self.path, scratch / "zip")
        dirs = {split: _unpacked(part, scratch) for split, part in _splits(root).items()}
        return SourceTree(root / LABELS_CSV, dirs["train"], dirs.get("test"))


def locate(src: Path) -> Source:
    """Classify SRC, list its folders and start fingerprinting it; PrepareError if it cannot be the data."""
    src = src.resolve()
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise PrepareError(f"{src}: not a directory or a zip file")
        return Source(src, "zip", _in_thread(_digest, ["zip", src.name, *_stat_key(src)]))
    if not src.is_dir():
        raise PrepareError(f"{src}: no such file or directory")
    parts = list(_splits(src).values())
    listings = {part: os.listdir(part) for part in parts if part.suffix != ".7z"}
    kind = "folders" if len(listings) == len(parts) else "7z"
    return Source(src, kind, _in_thread(_fingerprint, kind, src / LABELS_CSV, parts, listings), listings)


def _splits(root: Path) -> dict[str, Path]:
    """ROOT's train (required) and test parts, each its folder if there is one, else its .7z."""
    if not (root / LABELS_CSV).is_file():
        raise PrepareError(f"{root}: missing {LABELS_CSV}")
    parts: dict[str, Path] = {}
    for split in ("train", "test"):
        folder, packed = root / split, root / f"{split}.7z"
        if folder.is_dir():
            parts[split] = folder
        elif packed.is_file():
            parts[split] = packed
        elif split == "train":
            raise PrepareError(f"{root}: missing train/ (or train.7z)")
    return parts


def _fingerprint(kind: str, labels_csv: Path, parts: list[Path], listings: dict[Path, list[str]]) -> str:
    """The digest of the CSV (stat and content), each folder's names, sizes, mtimes, each archive's stat."""
    keys: list[object] = [kind, LABELS_CSV, *_stat_key(labels_csv), hashlib.sha256(labels_csv.read_bytes()).hexdigest()]
    for part in parts:
        keys += [part.name, *(_stat_keys(part, listings[part]) if part in listings else _stat_key(part))]
    return _digest(keys)


def _in_thread(fn: Callable[..., str], *args: object) -> Future[str]:
    """Run FN(*ARGS) in a thread of its own; its result (or error) waits in the future."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with the task
    return future


def list_pngs(folder: Path, names: list[str] | None = None) -> tuple[dict[int, str], list[str]]:
    """Map id -> file name for FOLDER's `<id>.png` files; also return the names that are not that."""
    if names is None:
        names = sorted(os.listdir(folder))
    found: dict[int, str] = {}
    bad: list[str] = []
    for name in names:
        stem = name[:-4]
        # <positive int without leading zero>.png, with str methods: a regex is slower over 350,000 names.
        if name.endswith(".png") and stem.isascii() and stem.isdigit() and stem[0] != "0":
            found[int(stem)] = name
        else:
            bad.append(f"{folder / name}: name is not <positive int>.png")
    return found, bad


def check_names(folder: Path, bad: list[str]) -> None:
    """Raise for file names that do not follow the competition's `<id>.png`."""
    if bad:
        raise PrepareError(offenders(f"{folder}: files not named <id>.png", bad))


def _unpacked(part: Path, scratch: Path) -> Path:
    """PART itself if it is a folder, else the .7z unpacked under SCRATCH (its SPLIT/ folder, if it has one)."""
    if part.suffix != ".7z":
        return part
    split = part.stem
    dest = scratch / f"{split}7z"
    archive.extract(part, dest)
    return dest / split if (dest / split).is_dir() else dest


def _zip_root(zip_path: Path, unpacked: Path) -> Path:
    """The folder inside the unpacked zip that holds trainLabels.csv (top level or one folder down)."""
    if (unpacked / LABELS_CSV).is_file():
        return unpacked
    subdirs = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / LABELS_CSV).is_file():
        return subdirs[0]
    raise PrepareError(f"{zip_path}: holds no {LABELS_CSV} (at the top or in a single top folder)")


def _stat_keys(folder: Path, names: list[str]) -> list[str]:
    """One 'name size mtime' key per entry of FOLDER, sorted by name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        keys = [f"{name} {_size_mtime(name, fd)}" for name in sorted(names)]
    finally:
        os.close(fd)
    return keys


def _size_mtime(name: str, dir_fd: int) -> str:
    try:
        st = os.stat(name, dir_fd=dir_fd)
    except OSError:  # a dangling link: decoding will name it
        return "-1 -1"
    return f"{st.st_size} {st.st_mtime_ns}"


def _stat_key(path: Path) -> list[object]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _digest(parts: list[object]) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()
