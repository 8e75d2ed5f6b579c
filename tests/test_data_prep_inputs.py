"""data_prep on bad input: a clear message, exit status 2, and PREP exactly as it was."""
from __future__ import annotations

import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import py7zr
import pytest
from data_prep_sources import (
    inflate_declared_size,
    leftovers,
    png_header_only,
    read_rgb,
    rename_in_7z,
    seven_zip_folder,
    snapshot,
    write_csv,
    write_source,
    zip_tree,
)
from PIL import Image

import data_prep
from contracts.errors import InputError
from data_prep import cli

pipeline = sys.modules["data_prep.preparation"]
SIZES = {"cat": 6, "dog": 5}  # ids 1..11, sorted in trainLabels.csv: id N is on line N + 1
CLASSES = ["--classes", ",".join(SIZES)]


def csv_rows(src: Path) -> list[list[str]]:
    return [line.split(",") for line in (src / "trainLabels.csv").read_text().splitlines()]


def append_rows(src: Path, *rows: str) -> None:
    with open(src / "trainLabels.csv", "a") as f:
        f.write("".join(row + "\n" for row in rows))


def relabel(src: Path, image_id: int, label: str) -> None:
    rows = csv_rows(src)
    rows[image_id] = [str(image_id), label]
    write_csv(src / "trainLabels.csv", rows)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def save_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(pixels, mode).save(path)


CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing labels": (lambda s: (s / "trainLabels.csv").unlink(), ["trainLabels.csv", "missing"]),
    "missing train": (lambda s: shutil.rmtree(s / "train"), ["missing train/"]),
    "bad header": (lambda s: write_csv(s / "trainLabels.csv", [("image", "class"), (1, "cat"), (2, "dog")]),
                   ["trainLabels.csv:1: header must be 'id,label'"]),
    "ids not positive integers": (lambda s: append_rows(s, "x,cat", "-3,cat", "0,dog", "1.5,dog"),
                                  ["trainLabels.csv: bad rows (4)", "trainLabels.csv:13: id 'x' is not a positive integer",
                                   "trainLabels.csv:14: id '-3'", "trainLabels.csv:15: id '0'",
                                   "trainLabels.csv:16: id '1.5'"]),
    "duplicate id": (lambda s: append_rows(s, "3,dog"), ["trainLabels.csv:13: duplicate id 3 (first on line 4)"]),
    "empty label": (lambda s: relabel(s, 5, ""), ["trainLabels.csv:6: id 5 has an empty label"]),
    "label not a folder name": (lambda s: relabel(s, 2, "cat/../x"), ["trainLabels.csv:3: label 'cat/../x' cannot be used"]),
    "labelled id without PNG": (lambda s: (s / "train" / "4.png").unlink(),
                                ["trainLabels.csv: labelled ids with no PNG", "line 5: id 4"]),
    "PNG without label": (lambda s: shutil.copy(s / "train" / "1.png", s / "train" / "99.png"),
                          ["PNGs with no label in", "train/99.png"]),
    "misnamed train and test files": (
        lambda s: (shutil.copy(s / "train" / "1.png", s / "train" / "cat.png"),
                   (s / "test" / "2.png").rename(s / "test" / "002.png")),
        ["files not named <id>.png (2)", "train/cat.png", "test/002.png"]),
    "truncated PNG": (lambda s: (s / "train" / "2.png").write_bytes((s / "train" / "2.png").read_bytes()[:150]),
                      ["train/2.png: truncated PNG (b'IDAT' chunk runs past the end)"]),
    "bad chunk CRC": (lambda s: flip_byte(s / "train" / "8.png", -1), ["train/8.png: corrupt PNG (bad CRC in the IEND chunk)"]),
    "cut after the pixels": (lambda s: (s / "test" / "4.png").write_bytes((s / "test" / "4.png").read_bytes()[:-12]),
                             ["test/4.png: truncated PNG (no IEND chunk)"]),
    "not a PNG": (lambda s: (s / "test" / "3.png").write_bytes(b"GIF89a" + bytes(100)),
                  ["test/3.png: not a PNG file"]),
    "not 32x32": (lambda s: save_png(s / "train" / "6.png", np.zeros((32, 33, 3), np.uint8)),
                  ["train/6.png: image is 33x32, expected 32x32"]),
    "huge image refused undecoded": (lambda s: (s / "train" / "7.png").write_bytes(png_header_only(100000, 100000)),
                                     ["train/7.png: image is 100000x100000, expected 32x32"]),
    "one class": (lambda s: write_csv(s / "trainLabels.csv", [("id", "label"), *((i, "cat") for i in range(1, 12))]),
                  ["trainLabels.csv: 1 class (cat); need at least 2"]),
    "first ten offenders and a count": (
        lambda s: [shutil.copy(s / "train" / "1.png", s / "train" / f"{i}.png") for i in range(100, 115)],
        ["PNGs with no label", "(15)", "train/100.png", "train/109.png", "... and 5 more"]),
}


@pytest.fixture
def good(tmp_path, capsys) -> tuple[Path, Path]:
    """A valid source and a PREP already prepared from it."""
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, SIZES, n_test=4)
    assert cli.main([*CLASSES, "--data", str(src), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    return src, out


def assert_refused(capsys, src: Path, out: Path, expected: list[str], *flags: str) -> str:
    """Exit 2 with EXPECTED in the message; an existing OUT untouched (even with --force), a new one not made."""
    before = snapshot(out)
    fresh = out.parent / "fresh"
    for target, extra in ((out, ["--force"]), (fresh, [])):
        status = cli.main([*CLASSES, "--data", str(src), "--out", str(target), "--workers", "1", *extra, *flags])
        err = capsys.readouterr().err
        assert status == 2, err
        assert err.startswith("cifar10-hvd prepare: "), err
        for text in expected:
            assert text in err, f"{text!r} not in:\n{err}"
    assert snapshot(out) == before
    assert not fresh.exists()
    assert leftovers(out) == [] and leftovers(fresh) == []
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_prep_untouched(good, capsys, case):
    src, out = good
    mutate, expected = CASES[case]
    mutate(src)
    err = assert_refused(capsys, src, out, expected)
    assert err.count("\n  ") <= 11  # at most ten offenders and the count line


def test_zip_member_escaping_the_target(good, tmp_path, capsys):
    src, out = good
    bad = tmp_path / "cifar-10.zip"
    zip_tree(bad, src, extra={"../evil.png": b"x", "/abs.png": b"y"})
    assert_refused(capsys, bad, out, ["cifar-10.zip: members that would escape the target (2)",
                                      "'../evil.png': path escapes", "'/abs.png': absolute path"])
    assert not list(tmp_path.rglob("evil.png")) and not Path("/abs.png").exists()


def test_7z_member_escaping_the_target(good, tmp_path, capsys):
    src, out = good
    packed = tmp_path / "packed"
    packed.mkdir()
    shutil.copy(src / "trainLabels.csv", packed)
    seven_zip_folder(packed / "test.7z", src / "test", "test")
    (src / "train" / "xx").mkdir()
    shutil.copy(src / "train" / "1.png", src / "train" / "xx" / "evil.png")
    with py7zr.SevenZipFile(packed / "train.7z", "w") as sz:  # py7zr will not write '../', so rename after
        sz.set_encoded_header_mode(False)
        sz.write(src / "train" / "xx" / "evil.png", "xx/evil.png")
    rename_in_7z(packed / "train.7z", "xx/evil.png", "../evil.png")
    assert_refused(capsys, packed, out, ["train.7z: members that would escape the target", "'../evil.png'"])
    assert list(tmp_path.rglob("evil.png")) == [src / "train" / "xx" / "evil.png"]


def test_archive_with_absurd_declared_size(good, tmp_path, capsys):
    src, out = good
    bomb = tmp_path / "cifar-10.zip"
    zip_tree(bomb, src, extra={"test.7z": bytes(1000)})
    inflate_declared_size(bomb, "test.7z", 3 << 30)
    assert_refused(capsys, bomb, out, ["cifar-10.zip: absurd declared sizes", "'test.7z': 3,221,225,472 bytes"])


def test_not_enough_disk_space(good, capsys, monkeypatch):
    src, out = good
    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    assert_refused(capsys, src, out, ["not enough disk space", "10,485,760 free"])


def test_source_that_is_neither_folder_nor_zip(good, tmp_path, capsys):
    _, out = good
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(capsys, tmp_path / "notes.txt", out, ["notes.txt: not a directory or a zip file"])
    assert_refused(capsys, tmp_path / "nowhere", out, ["nowhere: no such file or directory"])


def test_failure_mid_write_leaves_no_prep(good, capsys, monkeypatch):
    """A crash after some rows are written (an I/O error, a killed worker): OUT as it was, no temporary left."""
    src, out = good
    write_source(src.parent / "big", {"a": 700, "b": 600}, n_test=3)  # several decode chunks
    real = pipeline.decode_chunk
    calls = []

    def fail_second_chunk(task):
        calls.append(task[2])
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(task)

    monkeypatch.setattr(pipeline, "decode_chunk", fail_second_chunk)
    before = snapshot(out)
    for target, force in ((out, True), (out.parent / "fresh", False)):
        calls.clear()
        with pytest.raises(OSError, match="Input/output error"):
            data_prep.prepare(src.parent / "big", target, data_prep.PrepareConfig(workers=1, classes="a,b"), force=force)
        assert calls == [0, 512]  # the real writer wrote the first chunk's rows before the failure
    assert snapshot(out) == before
    assert not (out.parent / "fresh").exists()
    assert leftovers(out) == [] and leftovers(out.parent / "fresh") == []


def test_crlf_and_byte_order_mark_are_accepted(tmp_path, capsys):
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    labels = write_source(src, SIZES, n_test=2)
    write_csv(src / "trainLabels.csv", [("id", "label"), *sorted(labels.items())], newline="\r\n", bom=True)
    assert cli.main([*CLASSES, "--data", str(src), "--out", str(out), "--workers", "1"]) == 0, capsys.readouterr().err
    tv = data_prep.open_split(out, "train_valid")
    classes = data_prep.read_manifest(out)["classes"]
    assert classes == ["cat", "dog"]
    assert {int(i): classes[c] for i, c in zip(tv.ids, tv.labels, strict=True)} == labels


def test_grayscale_rgba_and_palette_are_converted_with_a_warning(tmp_path, capsys):
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, SIZES, n_test=2)
    rng = np.random.default_rng(1)
    save_png(src / "train" / "1.png", rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    save_png(src / "train" / "2.png", rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).quantize(16).save(src / "test" / "1.png")
    assert cli.main([*CLASSES, "--data", str(src), "--out", str(out), "--workers", "1"]) == 0
    assert "warning: 3 images were grayscale, RGBA or palette PNGs and were converted to RGB" in capsys.readouterr().err
    assert data_prep.read_manifest(out)["converted_to_rgb"] == 3
    tv = data_prep.open_split(out, "train_valid")
    for image_id in (1, 2):
        row = tv.ids.tolist().index(image_id)
        np.testing.assert_array_equal(tv.images[row], read_rgb(src / "train" / f"{image_id}.png"))
    np.testing.assert_array_equal(data_prep.open_split(out, "test").images[0], read_rgb(src / "test" / "1.png"))


def test_reading_an_unprepared_directory_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="manifest.json: missing; run `cifar10-hvd prepare"):
        data_prep.open_split(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data_prep.open_split(tmp_path, "dev")



def test_out_that_is_not_a_prepared_directory_is_never_replaced(good, tmp_path, capsys):
    """--force replaces only a directory holding this project's manifest."""
    src, _ = good
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    before = snapshot(other)
    for flags in ([], ["--force"]):
        assert cli.main([*CLASSES, "--data", str(src), "--out", str(other), "--workers", "1", *flags]) == 2
        err = capsys.readouterr().err
        assert "notes: exists and is not a prepared directory" in err and "--force" in err
    assert snapshot(other) == before
    stale = tmp_path / "stale"  # ours, from a format this version cannot read: --force may replace it
    stale.mkdir()
    (stale / "manifest.json").write_text('{"format_version": 999}')
    assert cli.main([*CLASSES, "--data", str(src), "--out", str(stale), "--workers", "1"]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert cli.main([*CLASSES, "--data", str(src), "--out", str(stale), "--workers", "1", "--force"]) == 0
    assert data_prep.read_manifest(stale)["classes"] == ["cat", "dog"]


def test_out_must_not_be_hold_or_lie_inside_the_source(good, capsys):
    """OUT == SRC, OUT above SRC, OUT inside SRC (SRC/train): refused with or without --force."""
    src, _ = good
    before = snapshot(src)
    for target, why in ((src, "would replace the source"), (src.parent, "would replace the source"),
                        (src / "train", "is inside the source"), (src / "prep", "is inside the source"),
                        (src / "test" / "deeper" / "prep", "is inside the source")):
        for flags in ([], ["--force"]):
            assert cli.main([*CLASSES, "--data", str(src), "--out", str(target), "--workers", "1", *flags]) == 2
            assert why in capsys.readouterr().err
    assert snapshot(src) == before


def pack_7z_copy(archive: Path, folder: Path, arcname: str) -> None:
    """FOLDER stored (no compression) in a .7z, so a test can find and damage a member's bytes."""
    with py7zr.SevenZipFile(archive, "w", filters=[{"id": py7zr.FILTER_COPY}]) as sz:
        sz.writeall(folder, arcname)


@pytest.fixture
def packed(good, tmp_path) -> Path:
    """The good source as train.7z + test.7z (stored) + trainLabels.csv."""
    src, _ = good
    packed = tmp_path / "packed"
    packed.mkdir()
    shutil.copy(src / "trainLabels.csv", packed)
    pack_7z_copy(packed / "test.7z", src / "test", "test")
    return packed


def test_streamed_7z_member_with_a_bad_crc(good, packed, capsys):
    """The 7z's own CRC is checked while streaming (libarchive reports it only as a warning)."""
    src, out = good
    pack_7z_copy(packed / "train.7z", src / "train", "train")
    data = bytearray((packed / "train.7z").read_bytes())
    png = (src / "train" / "4.png").read_bytes()
    at = data.find(png[40:80])
    assert at > 0
    data[at] ^= 0xFF
    (packed / "train.7z").write_bytes(bytes(data))
    assert_refused(capsys, packed, out, ["train.7z: unpacking failed", "bad CRC"])


def test_streamed_member_declared_too_large_is_not_read(good, packed, capsys):
    """A member over the PNG limit is refused by its declared size, in archive and zip alike."""
    src, out = good
    (src / "train" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3 << 20))
    pack_7z_copy(packed / "train.7z", src / "train", "train")
    assert_refused(capsys, packed, out, ["train.7z/train/9.png: larger than 1048576 bytes, not a 32x32 PNG"])
    zipped = packed.parent / "cifar-10.zip"
    zip_tree(zipped, src)
    assert_refused(capsys, zipped, out, ["cifar-10.zip/train/9.png: larger than 1048576 bytes"])


def test_truncated_archives(good, packed, capsys):
    src, out = good
    seven_zip_folder(packed / "train.7z", src / "train", "train")
    whole = (packed / "train.7z").read_bytes()
    (packed / "train.7z").write_bytes(whole[:len(whole) // 2])
    assert_refused(capsys, packed, out, ["train.7z: not a readable archive"])
    zipped = packed.parent / "cifar-10.zip"
    zip_tree(zipped, src)
    zipped.write_bytes(zipped.read_bytes()[:-200])
    assert_refused(capsys, zipped, out, ["cifar-10.zip: not a directory or a zip file"])  # no end record


def test_zip_member_with_a_bad_crc(good, tmp_path, capsys):
    src, out = good
    zipped = tmp_path / "cifar-10.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as zf:
        zf.write(src / "trainLabels.csv", "trainLabels.csv")
        for png in sorted((src / "train").iterdir()) + sorted((src / "test").iterdir()):
            zf.write(png, f"{png.parent.name}/{png.name}")
    data = bytearray(zipped.read_bytes())
    png = (src / "train" / "5.png").read_bytes()
    data[data.find(png[40:80])] ^= 0xFF
    zipped.write_bytes(bytes(data))
    assert_refused(capsys, zipped, out, ["cifar-10.zip/train: unpacking failed (BadZipFile: Bad CRC-32"])
