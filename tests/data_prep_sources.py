"""Builders of small Kaggle-layout sources with real PNGs, for the data_prep tests."""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_source(root: Path, class_sizes: dict[str, int], n_test: int = 7,
                 reverse: bool = False) -> dict[int, str]:
    """A Kaggle-layout folder (train/, test/, trainLabels.csv, sampleSubmission.csv); returns id -> label.

    Train ids are shuffled across classes; REVERSE writes the files in the opposite order.
    """
    rng = np.random.default_rng(0)
    names = [name for name, n in class_sizes.items() for _ in range(n)]
    order = rng.permutation(len(names))
    labels = {i + 1: names[j] for i, j in enumerate(order)}
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    train_pixels = {i: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in labels}
    test_pixels = {i: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(1, n_test + 1)}
    for folder, pixels in (("train", train_pixels), ("test", test_pixels)):
        for i in sorted(pixels, reverse=reverse):
            Image.fromarray(pixels[i]).save(root / folder / f"{i}.png")
    write_csv(root / "trainLabels.csv", [("id", "label"), *sorted(labels.items())])
    write_csv(root / "sampleSubmission.csv", [("id", "label"), *((i, "cat") for i in range(1, n_test + 1))])
    return labels


def write_csv(path: Path, rows, newline: str = "\n", bom: bool = False) -> None:
    """Rows joined by commas, as the competition writes them."""
    text = newline.join(",".join(map(str, row)) for row in rows) + newline
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())


def read_rgb(path: Path) -> np.ndarray:
    """A PNG decoded by Pillow independently of data_prep, as RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def snapshot(path: Path) -> dict[str, tuple[int, int, str]] | None:
    """Every file under PATH with size, mtime and content hash; None if PATH does not exist."""
    if not path.exists():
        return None
    state = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            file = Path(dirpath) / name
            st = file.stat()
            state[str(file.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(file.read_bytes()).hexdigest())
    return state


def leftovers(out: Path) -> list[str]:
    """Temporary siblings of OUT a failed run might have left."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring WIDTH x HEIGHT, with no pixel data (never decodable)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def zip_tree(zip_path: Path, root: Path, extra: dict[str, bytes] | None = None) -> None:
    """Zip ROOT's files (names relative to ROOT) plus EXTRA name -> bytes members."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(root).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def seven_zip_folder(archive: Path, folder: Path, arcname: str) -> None:
    """FOLDER packed into a .7z as ARCNAME/..., as the competition's train.7z and test.7z are."""
    import py7zr

    with py7zr.SevenZipFile(archive, "w") as sz:
        sz.writeall(folder, arcname)


def inflate_declared_size(zip_path: Path, member: str, declared: int) -> None:
    """Rewrite MEMBER's uncompressed size in the zip's central directory (a lying, bomb-like header)."""
    data = bytearray(zip_path.read_bytes())
    name = member.encode()
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + name_len]) == name:
            struct.pack_into("<I", data, at + 24, declared)
            zip_path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in {zip_path}")


def rename_in_7z(archive: Path, old: str, new: str) -> None:
    """Rename a member of an uncompressed-header .7z in place (same length), fixing the header CRCs.

    py7zr refuses to write escaping names, so a test builds 'xx/evil.png' and turns it into '../evil.png'.
    """
    assert len(old) == len(new)
    data = bytearray(archive.read_bytes())
    offset, size = struct.unpack_from("<QQ", data, 12)
    start = 32 + offset
    header = bytes(data[start:start + size])
    assert old.encode("utf-16-le") in header, "header is encoded; write with set_encoded_header_mode(False)"
    header = header.replace(old.encode("utf-16-le"), new.encode("utf-16-le"))
    data[start:start + size] = header
    struct.pack_into("<I", data, 28, zlib.crc32(header))
    struct.pack_into("<I", data, 8, zlib.crc32(bytes(data[12:32])))
    archive.write_bytes(bytes(data))
