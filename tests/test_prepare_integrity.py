"""prepare refuses a download whose classes or test ids changed silently, and cleans up its build directory
when it is stopped: each case runs the real `cifar10-hvd prepare` on a small Kaggle-like download."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, run_cli, tool_env
from data_prep_sources import leftovers, seven_zip_folder, write_csv, write_source, zip_tree

import data_prep
from contracts.labels import CIFAR10_CLASSES
from launcher import run_config

TEN = {name: 2 for name in CIFAR10_CLASSES}  # ids 1..20; trainLabels.csv holds id N on line N + 1


@pytest.fixture
def src(tmp_path) -> Path:
    """A valid ten-class download: train/ (20 PNGs), test/ (4 PNGs), trainLabels.csv, sampleSubmission.csv."""
    root = tmp_path / "kaggle"
    write_source(root, TEN, n_test=4)
    return root


def relabel(src: Path, old: str, new: str, limit: int | None = None) -> list[int]:
    """Replace label OLD by NEW in trainLabels.csv (on its first LIMIT rows holding OLD); return the lines changed."""
    rows = [line.split(",") for line in (src / "trainLabels.csv").read_text().splitlines()]
    lines = [n for n, row in enumerate(rows, start=1) if row[1] == old][:limit]
    for n in lines:
        rows[n - 1][1] = new
    write_csv(src / "trainLabels.csv", rows)
    return lines


def prepare(data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_cli(["prepare", "--data", str(data), "--out", str(out), "--workers", "1", *flags], timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, out: Path, *expected: str) -> None:
    """Exit 2, the `cifar10-hvd prepare:` message holding every EXPECTED text, no OUT and nothing beside it."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("cifar10-hvd prepare: "), proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_a_label_differing_from_a_class_only_in_case_is_named(src, tmp_path):
    (line,) = relabel(src, "cat", "Cat", limit=1)
    assert_refused(prepare(src, tmp_path / "prep"), tmp_path / "prep",
                   "labels that are not among the classes (1)", f"line {line}: 'Cat' differs from class 'cat' only in case")


def test_surrounding_whitespace_is_stripped_so_the_label_is_its_class(src, tmp_path):
    relabel(src, "cat", " cat\t", limit=1)
    proc = prepare(src, tmp_path / "prep")
    assert proc.returncode == 0, proc.stderr
    assert data_prep.read_manifest(tmp_path / "prep")["class_counts"]["train"][CIFAR10_CLASSES.index("cat")] + \
        data_prep.read_manifest(tmp_path / "prep")["class_counts"]["valid"][CIFAR10_CLASSES.index("cat")] == 2


def test_a_label_outside_the_classes_is_named_with_its_line(src, tmp_path):
    (line,) = relabel(src, "dog", "unicorn", limit=1)
    assert_refused(prepare(src, tmp_path / "prep"), tmp_path / "prep",
                   "trainLabels.csv: labels that are not among the classes (1)",
                   f"line {line}: 'unicorn' is not one of the classes", "--classes")


def test_many_rows_of_one_wrong_label_are_counted_not_listed(tmp_path):
    src = tmp_path / "kaggle"
    write_source(src, {**TEN, "cat": 30}, n_test=2)
    lines = relabel(src, "cat", "Cat")
    proc = prepare(src, tmp_path / "prep")
    assert_refused(proc, tmp_path / "prep", f"line {lines[0]}: 'Cat' differs from class 'cat' only in case "
                                            f"(and 29 more lines)")
    assert proc.stderr.count("'Cat'") == 1


def test_a_class_with_no_training_image_is_named(src, tmp_path):
    relabel(src, "cat", "dog")
    assert_refused(prepare(src, tmp_path / "prep"), tmp_path / "prep",
                   "classes with no training image in", "trainLabels.csv (1): 'cat'", "--classes")


def test_the_classes_flag_accepts_the_changed_download(src, tmp_path):
    relabel(src, "dog", "unicorn", limit=1)
    proc = prepare(src, tmp_path / "prep", "--classes", ",".join([*CIFAR10_CLASSES, "unicorn"]))
    assert proc.returncode == 0, proc.stderr
    assert data_prep.read_manifest(tmp_path / "prep")["classes"] == sorted([*CIFAR10_CLASSES, "unicorn"])
    relabel(src, "unicorn", "dog")
    relabel(src, "cat", "dog")
    nine = [c for c in CIFAR10_CLASSES if c != "cat"]
    proc = prepare(src, tmp_path / "nine", "--classes", ",".join(reversed(nine)))  # listed in any order
    assert proc.returncode == 0, proc.stderr
    assert data_prep.read_manifest(tmp_path / "nine")["classes"] == nine


def test_the_default_classes_keep_the_manifest_order(src, tmp_path):
    proc = prepare(src, tmp_path / "prep")
    assert proc.returncode == 0, proc.stderr
    assert data_prep.read_manifest(tmp_path / "prep")["classes"] == CIFAR10_CLASSES


def test_other_classes_than_the_prepared_ones_need_force(src, tmp_path):
    out = tmp_path / "prep"
    assert prepare(src, out).returncode == 0
    proc = prepare(src, out, "--classes", ",".join([*CIFAR10_CLASSES, "unicorn"]))
    assert proc.returncode == 2 and "prepared differently" in proc.stderr and "classes:" in proc.stderr, proc.stderr


def test_the_classes_key_of_a_config_file_and_of_a_run_config(src, tmp_path):
    relabel(src, "dog", "unicorn", limit=1)
    eleven = ",".join([*CIFAR10_CLASSES, "unicorn"])
    config = tmp_path / "c.yaml"
    config.write_text(f"prepare:\n  classes: {eleven}\n")
    proc = run_cli(["prepare", "--data", str(src), "--out", str(tmp_path / "prep"), "--config", str(config)])
    assert proc.returncode == 0, proc.stderr
    assert run_config.load_run_config(config).prepare.classes == eleven


@pytest.mark.parametrize("value, expected", [
    ("cat,,dog", "--classes: key 'classes' must be class names separated by commas"),
    ("cat,dog,cat", "--classes: 'cat' is listed more than once"),
    ("cat", "--classes: 1 class (cat); need at least 2"),
    ("cat,..", "--classes: label '..' cannot be used as a class folder name"),
])
def test_a_bad_classes_value_is_refused_naming_the_flag(src, tmp_path, value, expected):
    assert_refused(prepare(src, tmp_path / "prep", "--classes", value), tmp_path / "prep", expected)


def as_form(src: Path, form: str, tmp_path: Path) -> Path:
    """SRC as the folders themselves, train.7z + test.7z + the CSVs, or the competition zip of those."""
    if form == "folders":
        return src
    packed = tmp_path / "packed"
    packed.mkdir()
    seven_zip_folder(packed / "train.7z", src / "train", "train")
    seven_zip_folder(packed / "test.7z", src / "test", "test")
    for name in ("trainLabels.csv", "sampleSubmission.csv"):
        (packed / name).write_bytes((src / name).read_bytes())
    if form == "7z":
        return packed
    zip_tree(tmp_path / "cifar-10.zip", packed)
    return tmp_path / "cifar-10.zip"


@pytest.mark.parametrize("form", ["folders", "7z", "zip"])
def test_a_test_id_of_sample_submission_without_a_png_is_refused(src, tmp_path, form):
    (src / "test" / "2.png").unlink()
    (src / "test" / "3.png").unlink()
    data = as_form(src, form, tmp_path)
    assert_refused(prepare(data, tmp_path / "prep"), tmp_path / "prep",
                   "sampleSubmission.csv: 2 test ids without a PNG in", "(first: id 2, line 3)")


@pytest.mark.parametrize("form", ["folders", "7z", "zip"])
def test_a_test_png_not_in_sample_submission_is_refused(src, tmp_path, form):
    (src / "test" / "9.png").write_bytes((src / "test" / "1.png").read_bytes())
    data = as_form(src, form, tmp_path)
    assert_refused(prepare(data, tmp_path / "prep"), tmp_path / "prep",
                   "test: 1 test PNG whose id is not in", "sampleSubmission.csv (first: 9.png)")


def test_without_sample_submission_the_test_folder_is_taken_as_it_is(src, tmp_path):
    (src / "sampleSubmission.csv").unlink()
    (src / "test" / "2.png").unlink()
    proc = prepare(src, tmp_path / "prep")
    assert proc.returncode == 0, proc.stderr
    assert data_prep.open_split(tmp_path / "prep", "test").ids.tolist() == [1, 3, 4]


def slow_source(tmp_path: Path) -> Path:
    """A download whose decode (one worker: the test keeps a core to send its signal) takes seconds."""
    src = tmp_path / "big"
    write_source(src, {"a": 5000, "b": 5000}, n_test=5000)
    return src


def build_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def start_and_stop(src: Path, out: Path, signum: int) -> subprocess.Popen:
    """Start prepare, send SIGNUM once its build directory exists, and wait for it to end."""
    args = [str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(out), "--workers", "1", "--classes", "a,b"]
    # SIGINT as a terminal's foreground job has it: a test runner started in the background (`cmd &` in a
    # script) passes SIGINT on ignored, and an ignored signal stays ignored across exec
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=tool_env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not build_dirs(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert build_dirs(out) and proc.poll() is None, f"no build directory seen; exit {proc.poll()}"
    os.kill(proc.pid, signum)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stopped_prepare_removes_its_build_directory(tmp_path, signum, status):
    src, out = slow_source(tmp_path), tmp_path / "prep"
    proc = start_and_stop(src, out, signum)
    err = proc.stderr.read()
    assert proc.returncode == status, err
    assert "the prepared directory was left as it was" in err and "Traceback" not in err, err
    assert not out.exists() and leftovers(out) == []


def test_the_build_directory_of_a_killed_prepare_is_removed_by_the_next(tmp_path):
    src, out = slow_source(tmp_path), tmp_path / "prep"
    proc = start_and_stop(src, out, signal.SIGKILL)
    proc.stderr.close()
    (stale,) = build_dirs(out)
    assert re.fullmatch(rf"\.prep\.tmp-{proc.pid}-\w+", stale.name), stale.name
    alive = tmp_path / f".prep.tmp-{os.getpid()}-abcd1234"  # its writer (this test) still runs
    foreign = tmp_path / ".prep.tmp-notes"  # not a name prepare writes
    for keep in (alive, foreign):
        keep.mkdir()
        (keep / "file").write_text("kept")
    again = run_cli(["prepare", "--data", str(src), "--out", str(out), "--workers", "2", "--classes", "a,b"], timeout=300)
    assert again.returncode == 0, again.stderr
    assert not stale.exists()
    assert (alive / "file").read_text() == (foreign / "file").read_text() == "kept"


def test_a_prepared_directory_a_killed_publish_had_moved_aside_is_put_back(src, tmp_path):
    """Killed between publish's two renames: OUT gone, the previous OUT in .OUT.old-PID-*/prev."""
    out = tmp_path / "prep"
    assert prepare(src, out).returncode == 0
    aside = tmp_path / ".prep.old-999999999-killed01"  # a pid no process has
    aside.mkdir()
    out.rename(aside / "prev")
    proc = prepare(src, out)
    assert proc.returncode == 0 and "up to date" in proc.stderr, proc.stderr
    assert data_prep.read_manifest(out)["classes"] == CIFAR10_CLASSES and leftovers(out) == []
