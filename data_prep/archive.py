"""Read the competition's archives (its zip, train.7z, test.7z) member by member, never unpacking to disk.

Every member is checked before anything is decoded: no path may escape, no links, and the declared
unpacked size must be plausible for the packed size. Members then stream in archive order, each
read to at most a caller's limit plus one byte, its CRC checked by the reader (libarchive for 7z,
zipfile for zip), so a lying header or a bomb cannot make a read unbounded.
"""
from __future__ import annotations

import ctypes
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from contracts.errors import InputError, offenders

MAX_UNPACKED_BYTES = 64 << 30   # the real competition unpacks to under 1 GiB
MAX_RATIO = 200                 # PNGs barely compress; a higher unpacked/packed ratio is a bomb
RATIO_FLOOR_BYTES = 16 << 20    # small members may compress well (CSV): judge the ratio above this
DISK_MARGIN_BYTES = 64 << 20
READ_BLOCK = 1 << 20            # bytes per read from a 7z nested in the zip


@dataclass(frozen=True)
class Member:
    """One archive entry as declared in the archive's directory."""

    name: str
    size: int            # declared unpacked bytes
    packed: int | None   # packed bytes, where the format says (7z solid blocks do not)
    is_link: bool
    is_dir: bool = False


def unsafe_reason(name: str) -> str | None:
    """Why extracting NAME could write outside the target, or None if it cannot."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "absolute path"
    if ".." in posix and ".." in posix.split("/"):  # split, not PurePosixPath: this runs for 350,000 names
        return "path escapes the target with '..'"
    if "\x00" in posix:
        return "NUL in the name"
    return None


def open_zip(path: Path) -> tuple[zipfile.ZipFile, list[Member]]:
    """The zip at PATH opened, with its declared members; InputError if unreadable."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, truncated files ...
        raise InputError(f"{path}: not a readable archive ({type(exc).__name__}: {exc})") from None
    return zf, [Member(i.filename, i.file_size, i.compress_size, (i.external_attr >> 16) & 0o170000 == 0o120000,
                       i.is_dir()) for i in zf.infolist()]


def list_7z(file: Path | BinaryIO, shown: Path) -> list[Member]:
    """The members a .7z declares in its header. libarchive skips without decompressing when no data is read,
    so listing 300,000 members takes about a second and little memory (py7zr: several seconds, 300 MB)."""
    import libarchive  # imported here: only archives need it
    from libarchive.exception import ArchiveError

    try:
        with _reader(libarchive, file) as reader:
            return [Member(name, size, None, link, is_dir) for name, size, link, is_dir in _entries(reader)]
    except ArchiveError as exc:  # not a 7z, truncated, damaged header ...
        raise InputError(f"{shown}: not a readable archive (ArchiveError: {exc})") from None


def check_members(archive: Path, members: list[Member], packed_total: int) -> None:
    """Refuse an archive with escaping or linked members, or an absurd declared size."""
    bad = [f"{m.name!r}: {reason}" for m in members if (reason := unsafe_reason(m.name))]
    bad += [f"{m.name!r}: symbolic link" for m in members if m.is_link]
    if bad:
        raise InputError(offenders(f"{archive}: members that would escape the target", bad))
    declared = sum(m.size for m in members)
    if declared > MAX_UNPACKED_BYTES:
        raise InputError(f"{archive}: declares {declared:,} bytes unpacked, over the {MAX_UNPACKED_BYTES:,} "
                           "this competition could need; refusing to unpack")
    absurd = [m for m in members if m.packed is not None and m.size > RATIO_FLOOR_BYTES
              and m.size > MAX_RATIO * max(m.packed, 1)]
    if absurd or (declared > RATIO_FLOOR_BYTES and declared > MAX_RATIO * max(packed_total, 1)):
        names = [f"{m.name!r}: {m.size:,} bytes from {m.packed:,} packed" for m in absurd] or [
            f"{declared:,} bytes in all from {packed_total:,} packed"]
        raise InputError(offenders(f"{archive}: absurd declared sizes (more than {MAX_RATIO}x the packed size)",
                                     names))


def read_zip_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes | None:
    """NAME's bytes (CRC checked by zipfile when read to its end), or None if it declares over LIMIT bytes."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        return None
    with zf.open(info) as f:
        return f.read(limit + 1)


def stream_zip(zf: zipfile.ZipFile, shown: Path, names: dict[str, str], limit: int) -> Iterator[tuple[str, bytes | None]]:
    """(short name, bytes or None if over LIMIT) for each zip member named in NAMES (member -> short), in zip order."""
    for info in zf.infolist():
        short = names.get(info.filename)
        if short is None:
            continue
        try:
            yield short, read_zip_member(zf, info.filename, limit)
        except Exception as exc:  # zipfile.BadZipFile (bad CRC), zlib.error, truncated file ...
            raise InputError(f"{shown}: unpacking failed ({type(exc).__name__}: {exc})") from None


def stream_7z(file: Path | BinaryIO, shown: Path, names: dict[str, str], limit: int) -> Iterator[tuple[str, bytes | None]]:
    """(short name, bytes or None if over LIMIT) for each 7z member named in NAMES (member -> short), in archive order.

    libarchive decompresses in C with the GIL released, so the decode workers run meanwhile. A bad
    CRC, which libarchive reports only as a warning, is an error here.
    """
    import libarchive  # imported here: only archives need it
    from libarchive.exception import ArchiveError

    buffer = ctypes.create_string_buffer(limit + 1)
    try:
        with _reader(libarchive, file) as reader:
            for name, size, link, _ in _entries(reader):
                short = names.get(name)  # NAMES come from the checked listing: only a link can differ
                if short is None:
                    continue
                if link:
                    raise InputError(f"{shown}: member {name!r}: symbolic link")
                yield short, (None if size > limit else _read_entry(reader._pointer, buffer, size))
    except ArchiveError as exc:
        raise InputError(f"{shown}: unpacking failed (ArchiveError: {exc})") from None


def _entries(reader) -> Iterator[tuple[str, int, bool, bool]]:
    """(name, declared size, is a link, is a directory) of each entry, through one reused archive_entry.

    libarchive-c's own iterator allocates an entry per member and reads each attribute through a
    property; at 350,000 members that overhead lands on the core that runs LZMA.
    """
    from libarchive import ffi

    archive_p, entry_p = reader._pointer, ffi.entry_new()
    try:
        while ffi.read_next_header2(archive_p, entry_p) != ffi.ARCHIVE_EOF:
            kind = ffi.entry_filetype(entry_p) & 0o170000
            name = ffi.entry_pathname_w(entry_p) or (ffi.entry_pathname(entry_p) or b"").decode("utf-8", "replace")
            link = kind == 0o120000 or bool(ffi.entry_hardlink_w(entry_p) or ffi.entry_hardlink(entry_p))
            yield name, ffi.entry_size(entry_p), link, kind == 0o040000
    finally:
        ffi.entry_free(entry_p)


def _reader(libarchive, file: Path | BinaryIO):
    """A libarchive reader of the 7z at FILE (a path, or a seekable file such as a zip member)."""
    if isinstance(file, Path):
        return libarchive.file_reader(str(file), format_name="7zip", filter_name="none")
    return libarchive.stream_reader(file, format_name="7zip", filter_name="none", block_size=READ_BLOCK)


def _read_entry(archive_p, buffer: ctypes.Array, declared: int) -> bytes:
    """The current entry's data, at most len(BUFFER) bytes; ArchiveError on a bad CRC or a short member."""
    from libarchive.exception import ArchiveError
    from libarchive.ffi import error_string, read_data

    base, room, total = ctypes.addressof(buffer), len(buffer), 0
    while total < room:
        got = read_data(archive_p, base + total, room - total)
        if got == 0:
            break
        if got < 0:  # ARCHIVE_WARN: libarchive's 7z reader reports a CRC mismatch this way
            raise ArchiveError(error_string(archive_p).decode("utf-8", "replace"))
        total += got
    if total < declared and total < room:
        raise ArchiveError(f"member ends after {total} of its {declared} bytes")
    return ctypes.string_at(base, total)
