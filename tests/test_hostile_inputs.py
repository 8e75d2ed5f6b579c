"""Hostile inputs and outputs: devices, FIFOs and links at an output path stay untouched; every file read from
outside is bounded and must be a regular file; YAML that means two things (duplicate keys, aliases, deep
nesting) is refused; override and number errors say what the user gave. Each is exit 2 naming the file.

The commands run as subprocesses under an address-space limit, so a read that would grow without bound
ends as a failure of the test instead of as memory taken from the machine.
"""
from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, tool_env

from launcher import run_config

MEMORY_LIMIT = 6 << 30  # bytes of address space a command under test may map
TIMEOUT = float(os.environ.get("HOSTILE_TIMEOUT", 240))  # seconds; a FIFO with no writer would block for ever


def limited_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`cifar10-hvd ARGS` as a subprocess with MEMORY_LIMIT of address space and TIMEOUT seconds."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([str(BIN / "cifar10-hvd"), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=tool_env(), cwd=ROOT, preexec_fn=limit)


def char_device(path: Path, major: int, minor: int) -> Path:
    """A character-device node at path (a copy of /dev/full is 1,7, /dev/zero 1,5, /dev/urandom 1,9)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def link_to_file(path: Path) -> Path:
    target = path.with_name(path.name + ".target")
    target.write_text("kept\n")
    path.symlink_to(target)
    return path


NODES = {
    "char device": (lambda p: char_device(p, 1, 7), stat.S_ISCHR),
    "fifo": (fifo, stat.S_ISFIFO),
    "symlink": (link_to_file, stat.S_ISLNK),
}


def write_csv(path: Path, rows: dict[int, str]) -> Path:
    path.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in rows.items()))
    return path


@pytest.fixture
def scored(tmp_path) -> tuple[Path, Path]:
    """A submission and its solution, both fine."""
    rows = {1: "cat", 2: "dog", 3: "ship"}
    return write_csv(tmp_path / "submission.csv", rows), write_csv(tmp_path / "solution.csv", rows)


def assert_refused(proc: subprocess.CompletedProcess, stage: str, *named: str) -> None:
    """Exit 2 with one `cifar10-hvd STAGE: ...` message naming every string in named."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.startswith(f"cifar10-hvd {stage}: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in named:
        assert name in proc.stderr, proc.stderr


# --- outputs replace a regular file or nothing ------------------------------------------------------------

@pytest.mark.parametrize("kind", list(NODES))
def test_score_plot_never_replaces_a_device_fifo_or_link(scored, tmp_path, kind):
    make, is_kind = NODES[kind]
    node = make(tmp_path / "plot.png")
    sub, sol = scored
    proc = limited_cli(["score", "--submission", str(sub), "--solution", str(sol), "--plot", str(node)])
    assert_refused(proc, "score", str(node), "not a regular file")
    assert is_kind(os.lstat(node).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_predict_out_never_replaces_a_device_or_fifo_and_is_checked_before_inference(tmp_path):
    from test_predict import make_prepared, make_run

    _, prep = make_prepared(tmp_path, 4, n_train=20)
    run = make_run(tmp_path / "run")
    for kind in ("char device", "fifo"):
        make, is_kind = NODES[kind]
        node = make(tmp_path / f"{kind.replace(' ', '-')}.csv")
        proc = limited_cli(["predict", "--prepared", str(prep), "--model", str(run), "--out", str(node)])
        assert_refused(proc, "predict", f"{node}: --out is not a regular file")
        assert "images/s" not in proc.stdout  # refused before inference
        assert is_kind(os.lstat(node).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_write_refuses_a_directory_and_leaves_a_regular_file_replaceable(tmp_path):
    from contracts.errors import InputError
    from contracts.files import atomic_write_text

    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match=r"d: output is not a regular file \(a directory\)"):
        atomic_write_text(tmp_path / "d", "x")
    atomic_write_text(tmp_path / "f", "old")
    atomic_write_text(tmp_path / "f", "new")
    assert (tmp_path / "f").read_text() == "new"


# --- bounded reads of regular files only --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["--submission", "--solution"])
@pytest.mark.parametrize("node", ["zero", "urandom", "fifo"])
def test_score_refuses_a_device_or_fifo_as_input_without_reading_it(scored, tmp_path, which, node):
    path = fifo(tmp_path / "in.csv") if node == "fifo" else char_device(tmp_path / node, 1, 5 if node == "zero" else 9)
    sub, sol = scored
    args = {"--submission": str(sub), "--solution": str(sol), which: str(path)}
    proc = limited_cli(["score", *[x for kv in args.items() for x in kv]])
    assert_refused(proc, "score", str(path), "not a regular file")


def test_score_refuses_an_oversized_submission_by_its_size(scored, tmp_path):
    sub, sol = scored
    with open(sub, "ab") as f:
        f.truncate(2 << 30)  # sparse: 2 GB that take no disk
    proc = limited_cli(["score", "--submission", str(sub), "--solution", str(sol)])
    assert_refused(proc, "score", str(sub), "over the limit of")


@pytest.mark.parametrize("node", ["zero", "fifo", "sparse"])
def test_run_refuses_a_config_that_is_a_device_fifo_or_oversized(tmp_path, node):
    if node == "sparse":
        cfg = tmp_path / "big.yaml"
        cfg.write_text("train: {width: 4}\n")
        os.truncate(cfg, 1 << 30)
    else:
        cfg = fifo(tmp_path / "c.yaml") if node == "fifo" else char_device(tmp_path / "zero", 1, 5)
    proc = limited_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert_refused(proc, "run", str(cfg))
    assert not (tmp_path / "w").exists()


def test_train_refuses_a_config_that_is_a_device(tmp_path):
    cfg = char_device(tmp_path / "zero", 1, 5)
    proc = limited_cli(["train", "--prepared", str(tmp_path / "p"), "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert_refused(proc, "train", str(cfg), "not a regular file")


def test_run_refuses_a_hostfile_that_is_a_device(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"launch: {{hostfile: {char_device(tmp_path / 'hosts', 1, 5)}}}\n")
    proc = limited_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert_refused(proc, "run", str(tmp_path / "hosts"), "not a regular file")
    assert not (tmp_path / "w").exists()


def test_prepare_refuses_a_huge_sparse_labels_csv_by_its_size(tmp_path):
    src = tmp_path / "src"
    assert limited_cli(["demo-data", "--out", str(src), "--train", "20", "--test", "4"]).returncode == 0
    os.truncate(src / "trainLabels.csv", 2 << 30)
    proc = limited_cli(["prepare", "--data", str(src), "--out", str(tmp_path / "prep")])
    assert_refused(proc, "prepare", str(src / "trainLabels.csv"), "over the limit of")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "prep.lock") == ["src"]  # no prep, no temporary


def test_prepare_refuses_a_labels_csv_that_is_a_fifo(tmp_path):
    src = tmp_path / "src"
    assert limited_cli(["demo-data", "--out", str(src), "--train", "20", "--test", "4"]).returncode == 0
    shutil.move(src / "trainLabels.csv", tmp_path / "labels.csv")
    fifo(src / "trainLabels.csv")
    proc = limited_cli(["prepare", "--data", str(src), "--out", str(tmp_path / "prep")])
    assert_refused(proc, "prepare", str(src / "trainLabels.csv"))


# --- YAML that means one thing -----------------------------------------------------------------------------

# nine levels of nine aliases under phases: 9**9 names once expanded
BILLION_LAUGHS = "phases:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  - &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("text,expect", [
    (BILLION_LAUGHS, ":3: alias *a: YAML aliases are not allowed"),
    ("train:\n  width: 4\n  lr: 0.1\n  lr: 0.5\n", ":4: duplicate key 'lr' (first on line 3)"),
    ("train: {width: 4, lr_period: 3}\npredict: {tta: flip}\ntrain: {lr: 0.5}\n",
     ":3: duplicate key 'train' (first on line 1)"),
    ("train: " + "[" * 10000 + "\n", ":1: nested more than 32 levels deep"),
])
def test_yaml_that_means_two_things_or_explodes_is_refused_naming_the_lines(tmp_path, text, expect):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    proc = limited_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert_refused(proc, "run", f"{cfg}{expect}")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert not (tmp_path / "w").exists()


def test_a_stage_config_with_a_duplicate_key_is_refused_too(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("epochs: 1\nwidth: 4\nepochs: 2\n")
    proc = limited_cli(["train", "--prepared", str(tmp_path / "p"), "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert_refused(proc, "train", f"{cfg}:3: duplicate key 'epochs' (first on line 1)")


# --- what the user gave is what the message names ----------------------------------------------------------

def test_an_override_error_names_the_override_not_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {width: 4}\n")
    for override, expect in [("train.lr=abc", "override 'train.lr=abc': key 'lr' must be a number, got 'abc'"),
                             ("epochs=-1", "override 'epochs=-1': key 'epochs' must be >= "),
                             ("phases=sing", "override 'phases=sing': key 'phases' has unknown phase(s) sing")]:
        proc = limited_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), override])
        assert_refused(proc, "run", expect)
        assert str(cfg) not in proc.stderr


def test_exponent_numbers_are_numbers_and_out_of_range_ones_say_the_range(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 1e-3, wd: 5E-4, momentum: 1.5e0}\n")
    loaded = run_config.load_run_config(cfg, ["train.lr_decay=1e308", "predict.batch_size=64"])
    assert (loaded.train.lr, loaded.train.wd, loaded.train.momentum) == (0.001, 0.0005, 1.5)
    assert loaded.train.lr_decay == 1e308
    proc = limited_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "train.lr=1e309"])
    assert_refused(proc, "run", "override 'train.lr=1e309': key 'lr' must be a finite number")
    assert "1.8e+308" in proc.stderr


def test_the_resolved_config_quotes_strings_that_would_read_back_as_numbers(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: '1e5'\ntrain: {lr: 2.5e-3}\n")
    run_config.write_run_config(run_config.load_run_config(cfg), tmp_path / "resolved.yaml")
    again = run_config.load_run_config(tmp_path / "resolved.yaml")
    assert (again.data, again.train.lr) == ("1e5", 0.0025)
