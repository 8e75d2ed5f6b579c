"""Decode competition PNGs straight into a preallocated .npy, one chunk of images per task.

Workers write with os.pwrite at the rows' offset rather than through a memory map, so a worker's
resident memory stays one chunk of images whatever the size of the test set.

The competition's own format (8-bit RGB) is decoded by pyspng (libspng), about twice as fast as
Pillow and bit-identical to it; 16-bit PNGs of every colour type are scaled to 8 bits the same
way (round(v * 255 / 65535)); every other PNG (grayscale, RGBA, palette, 1-4 bits) goes through
Pillow's convert("RGB"), which is also the fallback where pyspng is not installed.

A worker reads a folder's PNG itself (a regular file only, at most the limit + 1 bytes) or gets
an archive member's bytes, already bounded, from the process streaming the archive.
"""
from __future__ import annotations

import ctypes
import io
import os
import signal
import stat
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import PngImagePlugin

try:
    import pyspng
except ImportError:  # optional speed-up; Pillow decodes everything on its own
    pyspng = None

SIDE = 32
ROW_BYTES = SIDE * SIDE * 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RGB_COLOR_TYPE = 2  # IHDR colour type of truecolour without alpha
MAX_PNG_BYTES = 1 << 20  # a 32x32 PNG is a few KiB; anything this large is not one


class BadImage(Exception):
    """A file that is not a readable 32x32 PNG; the message says why."""


@dataclass
class ChunkResult:
    """What decoding one chunk found: rows written, unreadable files, files converted to RGB."""

    rows: int
    errors: list[tuple[int, str]] = field(default_factory=list)  # (row, message)
    converted: list[str] = field(default_factory=list)


def check_chunks(data: bytes) -> None:
    """Walk the chunks: each must fit the file and match its CRC, and IEND must be reached.

    pyspng decodes with CRC checks off, and a file cut after its last IDAT can still decode.
    """
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            raise BadImage(f"truncated PNG ({bytes(view[pos + 4:pos + 8])!r} chunk runs past the end)")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise BadImage(f"corrupt PNG (bad CRC in the {bytes(view[pos + 4:pos + 8]).decode('latin-1')} chunk)")
        if view[pos + 4:pos + 8] == b"IEND":
            return
        pos = end
    raise BadImage("truncated PNG (no IEND chunk)")


def read_png(path: str) -> bytes:
    """PATH's bytes, refusing anything but a regular file (links resolved) and reading at most the limit + 1.

    O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it, like a device.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImage(f"not a regular file ({_file_kind(mode)}), not a PNG")
        data = os.read(fd, MAX_PNG_BYTES + 1)
        while len(data) <= MAX_PNG_BYTES and (more := os.read(fd, MAX_PNG_BYTES + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def decode_png(data: bytes | None) -> tuple[bytes, bool]:
    """The RGB pixels of a 32x32 PNG (HWC, row-major) and whether it had to be converted to RGB.

    DATA is None (or longer than the limit) for a file too large to be one. The header's size is
    checked before decoding, so a huge image is refused, never decoded.
    """
    if data is None or len(data) > MAX_PNG_BYTES:
        raise BadImage(f"larger than {MAX_PNG_BYTES} bytes, not a 32x32 PNG")
    if not data.startswith(PNG_SIGNATURE):
        raise BadImage("not a PNG file (bad signature)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage("truncated PNG (no IHDR header)")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if (width, height) != (SIDE, SIDE):
        raise BadImage(f"image is {width}x{height}, expected {SIDE}x{SIDE}")
    check_chunks(data)
    try:
        if pyspng is not None and bit_depth == 16:
            rgba16 = pyspng.c.spng_decode_image_bytes(data, pyspng.c.SPNG_FMT_RGBA16)  # load()'s auto fails on GA16
            pixels, converted = _scaled16(rgba16), color_type != RGB_COLOR_TYPE
        elif pyspng is not None and (bit_depth, color_type) == (8, RGB_COLOR_TYPE):
            pixels, converted = pyspng.load(data).tobytes(), False
        else:
            pixels, converted = _pillow(data)
    except Exception as exc:  # Pillow: OSError, SyntaxError, zlib.error ...; pyspng: RuntimeError
        raise BadImage(f"truncated or corrupt PNG ({exc})") from None
    if len(pixels) != ROW_BYTES:
        raise BadImage(f"decoded to {len(pixels)} bytes, expected {ROW_BYTES}")
    return pixels, converted


def _scaled16(samples: np.ndarray) -> bytes:
    """16-bit samples (gray, gray+alpha, RGB or RGBA; HW or HWC) as 8-bit RGB: round(v * 255 / 65535), alpha dropped.

    v * 255 / 65535 is v / 257, never exactly halfway for an integer v, so (v + 128) // 257 rounds it.
    """
    if samples.ndim == 2:
        samples = samples[:, :, None]
    channels = samples[:, :, :3] if samples.shape[2] >= 3 else np.repeat(samples[:, :, :1], 3, axis=2)
    return ((channels.astype(np.uint32) + 128) // 257).astype(np.uint8).tobytes()


def _pillow(data: bytes) -> tuple[bytes, bool]:
    """Pillow's decode, converted to RGB. 16-bit grayscale is scaled like _scaled16 (Pillow's convert clips it);
    without pyspng, Pillow keeps only the high byte of other 16-bit colour types."""
    image = PngImagePlugin.PngImageFile(io.BytesIO(data))
    image.load()
    if image.mode.startswith("I"):
        return _scaled16(np.asarray(image, dtype=np.uint16)), True
    if image.mode == "RGB":
        return image.tobytes(), False
    return image.convert("RGB").tobytes(), True


def decode_chunk(task: tuple[str, int, int, list[tuple[int, str, str | bytes | None, tuple[str, ...]]]]) -> ChunkResult:
    """Decode each item (row, name, path or bytes, layout copies) into its row of the .npy at NPY_PATH.

    The .npy's data starts at DATA_OFFSET; FIRST_ROW is the first item's row. Consecutive rows are
    written with one pwrite. An item's layout copies (archives only) are written once it decodes.
    """
    npy_path, data_offset, _, items = task
    result = ChunkResult(rows=len(items))
    decoded: list[tuple[int, bytes]] = []
    for row, name, source, copies in items:
        try:
            data = read_png(source) if isinstance(source, str) else source
            pixels, converted = decode_png(data)
        except BadImage as exc:
            result.errors.append((row, f"{name}: {exc}"))
            continue
        except OSError as exc:
            result.errors.append((row, f"{name}: cannot read ({exc.strerror or exc})"))
            continue
        decoded.append((row, pixels))
        if converted:
            result.converted.append(name)
        if copies:
            _write_copies(data, copies)
    _write_rows(npy_path, data_offset, decoded)
    return result


def _write_copies(data: bytes, copies: tuple[str, ...]) -> None:
    """The PNG's bytes at COPIES[0], hard-linked at the others."""
    try:
        with open(copies[0], "xb") as f:
            f.write(data)
        for other in copies[1:]:
            os.link(copies[0], other)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, exc.filename or copies[0]) from None


def _write_rows(npy_path: str, data_offset: int, decoded: list[tuple[int, bytes]]) -> None:
    """pwrite each run of consecutive rows at its offset; an OSError names NPY_PATH (disk full ...)."""
    decoded.sort(key=lambda item: item[0])
    fd = os.open(npy_path, os.O_WRONLY)
    try:
        start = 0
        while start < len(decoded):
            end = start + 1
            while end < len(decoded) and decoded[end][0] == decoded[end - 1][0] + 1:
                end += 1
            view = memoryview(b"".join(pixels for _, pixels in decoded[start:end]))
            offset = data_offset + decoded[start][0] * ROW_BYTES
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            start = end
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, npy_path) from None
    finally:
        os.close(fd)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, niceness: int = 0) -> None:
    """Worker initializer: have the kernel SIGKILL this worker when PARENT dies, even by SIGKILL; be NICENESS nicer.

    Without it a killed prepare left its workers (and, through them, multiprocessing's resource
    tracker) alive. A parent that died before the prctl is caught by the getppid check.
    """
    if niceness:
        os.nice(niceness)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to arm
        return
    if os.getppid() != parent:
        os._exit(1)
