"""Find the competition data in SRC (folders, train.7z/test.7z, or the competition zip) and fingerprint it.

The fingerprint is cheap on purpose (names, sizes and mtimes; an archive's size and mtime), so that
re-running `prepare` on unchanged data answers "up to date" without reading a single image.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from contracts.errors import InputError, offenders
from contracts.files import read_bounded
from contracts.labels import MAX_TABLE_BYTES
from data_prep import archive

LABELS_CSV = "trainLabels.csv"
SAMPLE_CSV = "sampleSubmission.csv"  # the test ids the competition expects a submission for
MAX_CSV_BYTES = MAX_TABLE_BYTES  # what read_table reads at most


@dataclass(frozen=True)
class Part:
    """One split's PNGs: a folder, or members of an archive streamed in archive order.

    SHOWN names the place in messages: the folder, or ARCHIVE/FOLDER for members. STREAM (archives
    only) yields (name, bytes, or None for a member declared over the limit) for the names it is given.
    """

    shown: Path
    names: list[str]
    stream: Callable[[set[str], int], Iterator[tuple[str, bytes | None]]] | None = None
    packed_bytes: int = 0

    @property
    def folder(self) -> Path | None:
        """The folder on disk holding the PNGs, None when they stream from an archive."""
        return None if self.stream else self.shown


@dataclass(frozen=True)
class SourceTree:
    """The competition files, ready to read: the labels CSV, each split's PNGs, the sample submission if any.

    CSV_SHOWN is where the CSVs are in the download, for messages (a zip's are read from copies).
    """

    labels_csv: Path
    train: Part
    test: Part | None
    sample_csv: Path | None = None
    csv_shown: Path | None = None

    def shown(self, csv: Path) -> Path:
        """CSV (one of the tree's CSVs) as the user knows it."""
        return self.csv_shown / csv.name if self.csv_shown else csv


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

    def materialize(self, scratch: Path, stack: ExitStack) -> SourceTree:
        """Folders as they are; archives listed and checked, their members left to stream (nothing unpacked).

        Only the zip's trainLabels.csv is copied (bounded) into SCRATCH; STACK closes the zip at the end.
        """
        if self.kind == "zip":
            return _zip_tree(self.path, scratch, stack)
        parts = {split: self._part(path) for split, path in _splits(self.path).items()}
        sample = self.path / SAMPLE_CSV
        return SourceTree(self.path / LABELS_CSV, parts["train"], parts.get("test"),
                          sample if os.path.lexists(sample) else None)

    def _part(self, path: Path) -> Part:
        if path.suffix != ".7z":
            return Part(path, self.listings[path])
        members = archive.list_7z(path, path)
        archive.check_members(path, members, path.stat().st_size)
        return _7z_part(path, members, path, path.stat().st_size)


def locate(src: Path) -> Source:
    """Classify SRC, list its folders and start fingerprinting it; InputError if it cannot be the data."""
    src = src.resolve()
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise InputError(f"{src}: not a directory or a zip file")
        return Source(src, "zip", _in_thread(_digest, ["zip", src.name, *_stat_key(src)]))
    if not src.is_dir():
        raise InputError(f"{src}: no such file or directory")
    parts = list(_splits(src).values())
    listings = {part: os.listdir(part) for part in parts if part.suffix != ".7z"}
    kind = "folders" if len(listings) == len(parts) else "7z"
    return Source(src, kind, _in_thread(_fingerprint, kind, src / LABELS_CSV, parts, listings), listings)


def _splits(root: Path) -> dict[str, Path]:
    """ROOT's train (required) and test parts, each its folder if there is one, else its .7z."""
    if not (root / LABELS_CSV).exists():  # anything but a file is refused, and named, when it is read
        raise InputError(f"{root}: missing {LABELS_CSV}")
    parts: dict[str, Path] = {}
    for split in ("train", "test"):
        folder, packed = root / split, root / f"{split}.7z"
        if folder.is_dir():
            parts[split] = folder
        elif packed.is_file():
            parts[split] = packed
        elif split == "train":
            raise InputError(f"{root}: missing train/ (or train.7z)")
    return parts


def _fingerprint(kind: str, labels_csv: Path, parts: list[Path], listings: dict[Path, list[str]]) -> str:
    """The digest of the CSV (stat and content), each folder's names, sizes, mtimes, each archive's stat."""
    keys: list[object] = [kind, LABELS_CSV, *_stat_key(labels_csv), hashlib.sha256(read_bounded(labels_csv, MAX_CSV_BYTES, "id,label file")).hexdigest()]
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
        raise InputError(offenders(f"{folder}: files not named <id>.png", bad))


def _7z_part(file: Path | Callable[[], BinaryIO], members: list[archive.Member], shown: Path, packed: int) -> Part:
    """The PNGs of a .7z (a path, or an opener of a zip member): those under its SPLIT/ folder, if it has one."""
    split = shown.stem
    prefix = f"{split}/" if any(m.name == split or m.name.startswith(f"{split}/") for m in members) else ""
    names = [m.name[len(prefix):] for m in members if not m.is_dir and m.name.startswith(prefix)]

    def stream(wanted: set[str], limit: int) -> Iterator[tuple[str, bytes | None]]:
        with ExitStack() as stack:
            opened = file if isinstance(file, Path) else stack.enter_context(file())
            yield from archive.stream_7z(opened, shown, {prefix + name: name for name in wanted}, limit)

    return Part(shown / split if prefix else shown, names, stream, packed)


def _zip_tree(zip_path: Path, scratch: Path, stack: ExitStack) -> SourceTree:
    """The zip's CSV (copied to SCRATCH) and its train/test parts: folders of PNGs or nested .7z members."""
    zf, members = archive.open_zip(zip_path)
    stack.enter_context(zf)
    archive.check_members(zip_path, members, zip_path.stat().st_size)
    files = {m.name: m for m in members if not m.is_dir}
    root = _zip_root(zip_path, files)
    scratch.mkdir(parents=True, exist_ok=True)
    csv = _copy_csv(zf, zip_path, root + LABELS_CSV, scratch)
    sample = _copy_csv(zf, zip_path, root + SAMPLE_CSV, scratch) if root + SAMPLE_CSV in files else None
    parts: dict[str, Part] = {}
    for split in ("train", "test"):
        folder, packed = f"{root}{split}/", f"{root}{split}.7z"
        if any(name.startswith(folder) for name in files):
            names = {name[len(folder):]: name for name in files if name.startswith(folder)}
            parts[split] = Part(zip_path / folder.rstrip("/"), sorted(names), _zip_stream(zf, zip_path / folder, folder),
                                sum(files[n].packed or 0 for n in names.values()))
        elif packed in files:
            def opener(name: str = packed) -> BinaryIO:
                return zf.open(name)
            shown = zip_path / packed
            with opener() as f:
                inner = archive.list_7z(f, shown)
            archive.check_members(shown, inner, files[packed].size)
            parts[split] = _7z_part(opener, inner, shown, files[packed].packed or 0)
        elif split == "train":
            raise InputError(f"{zip_path / root}: missing train/ (or train.7z)")
    return SourceTree(csv, parts["train"], parts.get("test"), sample, zip_path / root)


def _copy_csv(zf: zipfile.ZipFile, zip_path: Path, member: str, scratch: Path) -> Path:
    """The zip's MEMBER (a CSV, at most MAX_CSV_BYTES) copied into SCRATCH, for read_table."""
    data = archive.read_zip_member(zf, member, MAX_CSV_BYTES)
    if data is None or len(data) > MAX_CSV_BYTES:
        raise InputError(f"{zip_path}: {member} is over {MAX_CSV_BYTES:,} bytes; not the competition's")
    copy = scratch / Path(member).name
    copy.write_bytes(data)
    return copy


def _zip_stream(zf: zipfile.ZipFile, shown: Path, folder: str) -> Callable[[set[str], int], Iterator]:
    def stream(wanted: set[str], limit: int) -> Iterator[tuple[str, bytes | None]]:
        return archive.stream_zip(zf, shown, {folder + name: name for name in wanted}, limit)
    return stream


def _zip_root(zip_path: Path, files: dict[str, archive.Member]) -> str:
    """The folder inside the zip that holds trainLabels.csv ('' for the top, or 'one-folder/')."""
    if LABELS_CSV in files:
        return ""
    tops = {name.split("/", 1)[0] for name in files if "/" in name}
    if len(tops) == 1 and f"{next(iter(tops))}/{LABELS_CSV}" in files:
        return f"{next(iter(tops))}/"
    raise InputError(f"{zip_path}: holds no {LABELS_CSV} (at the top or in a single top folder)")


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
