"""Unpack the competition's archives (its zip, train.7z, test.7z) safely into a scratch folder.

Every member is checked before anything is written: no path may escape the target, no links,
and the declared unpacked size must be plausible for the packed size and fit on the disk.
"""
from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_prep.errors import PrepareError, offenders

MAX_UNPACKED_BYTES = 64 << 30   # the real competition unpacks to under 1 GiB
MAX_RATIO = 200                 # PNGs barely compress; a higher unpacked/packed ratio is a bomb
RATIO_FLOOR_BYTES = 16 << 20    # small members may compress well (CSV): judge the ratio above this
DISK_MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class Member:
    """One archive entry as declared in the archive's directory."""

    name: str
    size: int            # declared unpacked bytes
    packed: int | None   # packed bytes, where the format says (7z solid blocks do not)
    is_link: bool


def unsafe_reason(name: str) -> str | None:
    """Why extracting NAME could write outside the target, or None if it cannot."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "path escapes the target with '..'"
    if "\x00" in posix:
        return "NUL in the name"
    return None


def _open(archive: Path):
    """The archive opened by its content (a zip, else 7z), with its declared members; PrepareError if unreadable."""
    try:
        if zipfile.is_zipfile(archive):
            zf = zipfile.ZipFile(archive)
            return zf, [Member(i.filename, i.file_size, i.compress_size, (i.external_attr >> 16) & 0o170000 == 0o120000)
                        for i in zf.infolist()]
        import py7zr  # imported here: it is slow to import and only archives need it
        sz = py7zr.SevenZipFile(archive, "r")
        return sz, [Member(f.filename, f.uncompressed or 0, f.compressed, f.is_symlink) for f in sz.list()]
    except Exception as exc:  # zipfile.BadZipFile, py7zr.Bad7zFile, lzma errors, truncated files ...
        raise PrepareError(f"{archive}: not a readable archive ({type(exc).__name__}: {exc})") from None


def check_members(archive: Path, members: list[Member], free_bytes: int) -> None:
    """Refuse an archive with escaping or linked members, or an absurd or unfittable declared size."""
    bad = [f"{m.name!r}: {reason}" for m in members if (reason := unsafe_reason(m.name))]
    bad += [f"{m.name!r}: symbolic link" for m in members if m.is_link]
    if bad:
        raise PrepareError(offenders(f"{archive}: members that would escape the target", bad))
    packed_total = archive.stat().st_size
    declared = sum(m.size for m in members)
    if declared > MAX_UNPACKED_BYTES:
        raise PrepareError(f"{archive}: declares {declared:,} bytes unpacked, over the {MAX_UNPACKED_BYTES:,} "
                           "this competition could need; refusing to unpack")
    absurd = [m for m in members if m.packed is not None and m.size > RATIO_FLOOR_BYTES
              and m.size > MAX_RATIO * max(m.packed, 1)]
    if absurd or (declared > RATIO_FLOOR_BYTES and declared > MAX_RATIO * max(packed_total, 1)):
        names = [f"{m.name!r}: {m.size:,} bytes from {m.packed:,} packed" for m in absurd] or [
            f"{declared:,} bytes in all from {packed_total:,} packed"]
        raise PrepareError(offenders(f"{archive}: absurd declared sizes (more than {MAX_RATIO}x the packed size)",
                                     names))
    if declared + DISK_MARGIN_BYTES > free_bytes:
        raise PrepareError(f"{archive}: unpacking needs {declared:,} bytes but only {free_bytes:,} are free")


def extract(archive: Path, dest: Path) -> None:
    """Check ARCHIVE's members, then unpack it into DEST (created); the archive is opened and parsed once."""
    handle, members = _open(archive)
    with handle:
        dest.mkdir(parents=True, exist_ok=True)
        check_members(archive, members, shutil.disk_usage(dest).free)
        try:
            if isinstance(handle, zipfile.ZipFile):
                _extract_zip(handle, dest)
            else:
                handle.extractall(path=dest)
        except Exception as exc:
            raise PrepareError(f"{archive}: unpacking failed ({type(exc).__name__}: {exc})") from None


def _extract_zip(zf: zipfile.ZipFile, dest: Path) -> None:
    """Unpack member by member; zipfile stops each at its declared size and checks its CRC."""
    for info in zf.infolist():
        target = dest / info.filename.replace("\\", "/")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
