"""data_prep edge cases: every PNG colour type and bit depth, files that are not files,
a killed prepare's workers, a disk that fills up during the decode."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, ROOT, small_tmpfs, tool_env
from data_prep_sources import leftovers, snapshot, write_source

import data_prep
from data_prep import cli

pipeline = sys.modules["data_prep.preparation"]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def encode_png(samples: np.ndarray, bit_depth: int, color_type: int, palette: np.ndarray | None = None) -> bytes:
    """A 32x32 PNG written by hand (filter 0, one IDAT) from raw SAMPLES (32 x 32 x channels), independent of Pillow."""
    rows = []
    for row in samples.reshape(32, -1).astype(np.uint16):
        if bit_depth == 16:
            packed = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            packed = row.astype(np.uint8).tobytes()
        else:
            bits = (row[:, None] >> np.arange(bit_depth - 1, -1, -1)) & 1
            packed = np.packbits(bits.astype(np.uint8).ravel()).tobytes()
        rows.append(b"\x00" + packed)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    return png + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def png_case(color_type: int, bit_depth: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A PNG of that type and depth with random samples, and the RGB it must decode to.

    n-bit samples scale by 255 / (2**n - 1): exact below 16 bits, round(v * 255 / 65535) at 16 (so 40000 -> 156).
    Alpha is dropped; palette indices pick their palette entry.
    """
    top = (1 << bit_depth) - 1
    samples = rng.integers(0, top + 1, (32, 32, CHANNELS[color_type]))
    samples[0, 0, :] = top if bit_depth < 16 else 40000
    if color_type == 3:
        palette = rng.integers(0, 256, (top + 1, 3))
        return encode_png(samples, bit_depth, 3, palette), palette[samples[:, :, 0]].astype(np.uint8)
    scaled = np.floor(samples * 255 / top + 0.5).astype(np.uint8)  # exact for n < 16: 255 / top is an integer
    rgb = scaled[:, :, :3] if color_type in (2, 6) else np.repeat(scaled[:, :, :1], 3, axis=2)
    return encode_png(samples, bit_depth, color_type), rgb


CASES = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
         (4, 8), (4, 16), (6, 8), (6, 16)]


@pytest.mark.parametrize("pyspng", ["installed", "absent"])
def test_every_png_colour_type_and_bit_depth(tmp_path, capsys, monkeypatch, pyspng):
    """Every PNG colour type and bit depth decodes as specified (16-bit grayscale 40000 is not clipped to 255).

    Without pyspng, Pillow keeps only the high byte of 16-bit colour and gray+alpha samples: those cases
    are checked with pyspng only.
    """
    if pyspng == "absent":
        monkeypatch.setattr(sys.modules["data_prep.decode"], "pyspng", None)
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    labels = write_source(src, {"cat": 10, "dog": 10}, n_test=1)
    rng = np.random.default_rng(7)
    expected = {}
    cases = [c for c in CASES if pyspng == "installed" or c[1] < 16 or c[0] == 0]
    for image_id, (color_type, depth) in enumerate(cases, start=1):
        data, expected[image_id] = png_case(color_type, depth, rng)
        (src / "train" / f"{image_id}.png").write_bytes(data)
    assert cli.main(["--data", str(src), "--out", str(out), "--workers", "1", "--classes", "cat,dog"]) == 0, \
        capsys.readouterr().err
    tv = data_prep.open_split(out, "train_valid")
    rows = {int(i): r for r, i in enumerate(tv.ids)}
    for image_id, (color_type, depth) in enumerate(cases, start=1):
        np.testing.assert_array_equal(tv.images[rows[image_id]], expected[image_id],
                                      err_msg=f"colour type {color_type}, {depth} bits ({labels[image_id]})")
    assert tv.images[rows[cases.index((0, 16)) + 1]][0, 0].tolist() == [156, 156, 156]


def limited_memory() -> None:
    """In the child: an address-space cap, so an unbounded read fails fast instead of eating the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_fifo_and_link_to_a_device_are_refused_without_blocking(tmp_path):
    """A FIFO at train/7.png and a link to /dev/zero are refused at once: prepare neither blocks nor reads
    without bound."""
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, {"cat": 6, "dog": 5}, n_test=2)
    (src / "train" / "7.png").unlink()
    os.mkfifo(src / "train" / "7.png")
    (src / "train" / "3.png").unlink()
    os.symlink("/dev/zero", src / "train" / "3.png")
    shutil.move(src / "train" / "5.png", tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", src / "train" / "5.png")  # a link to a regular file is fine
    proc = subprocess.run([str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(out), "--workers", "2",
                           "--classes", "cat,dog"],
                          capture_output=True, text=True, timeout=120, env=tool_env(), cwd=ROOT, preexec_fn=limited_memory)
    assert proc.returncode == 2, proc.stderr
    assert "images that are not readable 32x32 PNGs (2)" in proc.stderr
    assert "train/3.png: not a regular file (a character device)" in proc.stderr
    assert "train/7.png: not a regular file (a FIFO)" in proc.stderr
    assert not out.exists() and leftovers(out) == []


def children(pid: int) -> set[int]:
    """PIDs whose parent is PID (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """PID exists and is not a zombie (a container's init may never reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_die_with_a_killed_prepare(tmp_path):
    """After SIGKILL of `prepare --workers 2`, its workers and resource tracker end too."""
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, {"a": 4000, "b": 4000}, n_test=4000)
    args = [str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(out), "--workers", "2", "--classes", "a,b"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=tool_env(), cwd=ROOT)
    deadline = time.monotonic() + 60
    kids: set[int] = set()
    while len(kids) < 3 and proc.poll() is None and time.monotonic() < deadline:  # 2 workers + the resource tracker
        kids |= children(proc.pid)
        time.sleep(0.01)
    assert len(kids) >= 3 and proc.poll() is None, f"children seen: {kids}; exit {proc.poll()}"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in kids if alive(pid)]
    for pid in survivors:  # do not leave them running if the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "processes outlived the killed prepare"
    again = subprocess.run(args, capture_output=True, text=True, timeout=120, env=tool_env(), cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert "waiting for another prepare" not in again.stderr and leftovers(out) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only)."""
    with small_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_during_decode(tmp_path, tiny_disk, capsys, monkeypatch, workers):
    """A disk that fills during the decode is exit 2 naming the output and the file being written, not a
    raw `OSError: [Errno 28]`; the output is left as it was.

    The space check before writing is told the disk has room (as when another process fills it
    meanwhile); the 1 MiB tmpfs then runs out for real while the workers write ~2 MB of rows.
    """
    small, big = tmp_path / "small", tmp_path / "big"
    write_source(small, {"cat": 3, "dog": 3}, n_test=1)
    write_source(big, {"cat": 350, "dog": 350}, n_test=1)
    out = tiny_disk / "prep"
    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    assert cli.main(["--data", str(small), "--out", str(out), "--workers", "1", "--classes", "cat,dog"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    for target, flags in ((out, ["--force"]), (tiny_disk / "fresh", [])):
        status = cli.main(["--data", str(big), "--out", str(target), "--workers", workers, "--classes", "cat,dog", *flags])
        err = capsys.readouterr().err
        assert status == 2, err
        assert err.startswith(f"cifar10-hvd prepare: {target}: No space left on device (writing trainval_images.npy)"), err
    assert snapshot(out) == before
    assert not (tiny_disk / "fresh").exists()
    assert leftovers(out) == [] and leftovers(tiny_disk / "fresh") == []
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["fresh.lock", "prep", "prep.lock"]  # locks stay, as always
