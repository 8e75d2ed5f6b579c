"""Decode competition PNGs straight into a preallocated .npy, one chunk of rows per task.

Workers write with os.pwrite at the rows' offset rather than through a memory map, so a worker's
resident memory stays one chunk of images whatever the size of the test set.

The competition's own format (8-bit RGB) is decoded by pyspng (libspng), about twice as fast as
Pillow and bit-identical to it; every other PNG (grayscale, RGBA, palette, 16-bit) goes through
Pillow's convert("RGB"), which is also the fallback where pyspng is not installed.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field

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
    errors: list[str] = field(default_factory=list)
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


def decode_png(path: str) -> tuple[bytes, bool]:
    """The RGB pixels of a 32x32 PNG (HWC, row-major) and whether it had to be converted to RGB.

    The header's size is checked before decoding, so a huge image is refused, never decoded.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_PNG_BYTES:
            raise BadImage(f"larger than {MAX_PNG_BYTES} bytes, not a 32x32 PNG")
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        raise BadImage("not a PNG file (bad signature)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage("truncated PNG (no IHDR header)")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if (width, height) != (SIDE, SIDE):
        raise BadImage(f"image is {width}x{height}, expected {SIDE}x{SIDE}")
    check_chunks(data)
    try:
        if pyspng is not None and (bit_depth, color_type) == (8, RGB_COLOR_TYPE):
            pixels = pyspng.load(data).tobytes()
            converted = False
        else:
            image = PngImagePlugin.PngImageFile(io.BytesIO(data))
            image.load()
            converted = image.mode != "RGB"
            if converted:
                image = image.convert("RGB")
            pixels = image.tobytes()
    except Exception as exc:  # Pillow: OSError, SyntaxError, zlib.error ...; pyspng: RuntimeError
        raise BadImage(f"truncated or corrupt PNG ({exc})") from None
    if len(pixels) != ROW_BYTES:
        raise BadImage(f"decoded to {len(pixels)} bytes, expected {ROW_BYTES}")
    return pixels, converted


def decode_chunk(task: tuple[str, int, int, list[str]]) -> ChunkResult:
    """Decode PATHS into rows FIRST_ROW.. of the .npy at NPY_PATH whose data starts at DATA_OFFSET."""
    npy_path, data_offset, first_row, paths = task
    buffer = bytearray(len(paths) * ROW_BYTES)
    result = ChunkResult(rows=len(paths))
    for i, path in enumerate(paths):
        try:
            pixels, converted = decode_png(path)
        except BadImage as exc:
            result.errors.append(f"{path}: {exc}")
            continue
        except OSError as exc:
            result.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        buffer[i * ROW_BYTES:(i + 1) * ROW_BYTES] = pixels
        if converted:
            result.converted.append(path)
    fd = os.open(npy_path, os.O_WRONLY)
    try:
        view = memoryview(buffer)
        offset = data_offset + first_row * ROW_BYTES
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
    return result
