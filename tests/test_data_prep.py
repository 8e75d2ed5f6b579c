"""data_prep: round trip, the split rule, determinism, idempotence, locking, archives and the folders layout."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, tool_env
from data_prep_sources import leftovers, read_rgb, seven_zip_folder, snapshot, write_source, zip_tree

import data_prep
from data_prep import cli

UNEVEN = {"cat": 23, "dog": 11, "frog": 6, "ship": 3}


def prepare_cli(capsys, *args: str, classes=UNEVEN) -> tuple[int, str]:
    """`cifar10-hvd prepare ARGS --classes CLASSES` in this process (the real code path, minus interpreter start-up)."""
    status = cli.main([*args, "--classes", ",".join(classes)])
    return status, capsys.readouterr().err


@pytest.fixture
def uneven(tmp_path) -> tuple[Path, dict[int, str]]:
    src = tmp_path / "kaggle"
    return src, write_source(src, UNEVEN, n_test=9)


def test_round_trip_is_bit_exact(uneven, tmp_path, capsys):
    src, labels = uneven
    out = tmp_path / "prep"
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--workers", "1")
    assert status == 0, err
    assert "images/s" in err
    manifest = data_prep.read_manifest(out)
    classes = manifest["classes"]
    assert classes == sorted(UNEVEN)
    assert manifest["image_shape"] == [32, 32, 3]
    for split in ("train", "valid", "train_valid"):
        images, split_labels, ids = data_prep.open_split(out, split)
        assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert split_labels.dtype == np.int64 and ids.dtype == np.int64
        for row, image_id in enumerate(ids):
            assert classes[split_labels[row]] == labels[image_id]
            np.testing.assert_array_equal(images[row], read_rgb(src / "train" / f"{image_id}.png"))
    test = data_prep.open_split(out, "test")
    assert test.labels is None
    assert test.ids.tolist() == list(range(1, 10))
    for row, image_id in enumerate(test.ids):
        np.testing.assert_array_equal(test.images[row], read_rgb(src / "test" / f"{image_id}.png"))
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (out / name).stat().st_size
        np.load(out / name, mmap_mode="r", allow_pickle=False)


@pytest.mark.parametrize("sizes, ratio", [
    (UNEVEN, 0.1),                               # smallest class 3 < 1/r: one image of each class held out
    ({"a": 40, "b": 31, "c": 17}, 0.25),         # floor(17 * 0.25) = 4 of each
    ({"a": 5, "b": 5}, 0.5),                     # floor(2.5) = 2
    ({"a": 9, "b": 1}, 0.1),                     # a class of one: it all goes to valid
])
def test_split_counts_follow_the_seed_rule_per_class(tmp_path, capsys, sizes, ratio):
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, sizes, n_test=2)
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--valid-ratio", str(ratio), "--workers", "1",
                              classes=sizes)
    assert status == 0, err
    k = max(1, math.floor(min(sizes.values()) * ratio))
    manifest = data_prep.read_manifest(out)
    assert manifest["n_valid_per_label"] == k
    train, valid, both = (data_prep.open_split(out, s) for s in ("train", "valid", "train_valid"))
    classes = manifest["classes"]
    assert Counter(classes[i] for i in valid.labels) == {name: k for name in sizes}
    assert Counter(classes[i] for i in train.labels) == {name: n - k for name, n in sizes.items() if n > k}
    assert manifest["splits"]["train"]["count"] == sum(sizes.values()) - k * len(sizes)
    assert manifest["splits"]["valid"]["count"] == k * len(sizes)
    assert not set(train.ids) & set(valid.ids)
    assert sorted(both.ids) == sorted([*train.ids, *valid.ids]) == list(range(1, sum(sizes.values()) + 1))


def test_same_choice_across_runs_workers_and_file_order(tmp_path, capsys):
    sizes = {"a": 300, "b": 250, "c": 200}  # > 1 decode chunk, so two workers share the work
    first, second = tmp_path / "one", tmp_path / "two"
    write_source(first, sizes, n_test=600)
    write_source(second, sizes, n_test=600, reverse=True)  # same images written in the opposite order
    runs = [(first, "1"), (second, "2"), (first, "2")]
    manifests = []
    for i, (src, workers) in enumerate(runs):
        status, err = prepare_cli(capsys, "--data", str(src), "--out", str(tmp_path / f"prep{i}"), "--workers", workers,
                                  classes=sizes)
        assert status == 0, err
        manifests.append(data_prep.read_manifest(tmp_path / f"prep{i}"))
    hashes = [{name: f["sha256"] for name, f in m["files"].items()} for m in manifests]
    assert hashes[0] == hashes[1] == hashes[2]
    valid = data_prep.open_split(tmp_path / "prep0", "valid").ids
    # The held-out images are a shuffle, not the first ids of each class ...
    labels = data_prep.open_split(tmp_path / "prep0", "train_valid")
    for c in range(3):
        ids_c = sorted(labels.ids[labels.labels == c].tolist())
        chosen = sorted(set(valid.tolist()) & set(ids_c))
        assert chosen != ids_c[: len(chosen)]
    # ... and another seed chooses others.
    status, err = prepare_cli(capsys, "--data", str(first), "--out", str(tmp_path / "seed1"), "--seed", "1", "--workers", "1",
                              classes=sizes)
    assert status == 0, err
    assert data_prep.open_split(tmp_path / "seed1", "valid").ids.tolist() != valid.tolist()


def test_rerun_is_up_to_date_other_parameters_need_force(uneven, tmp_path, capsys):
    src, _ = uneven
    out = tmp_path / "prep"
    assert prepare_cli(capsys, "--data", str(src), "--out", str(out), "--workers", "1")[0] == 0
    before = snapshot(out)
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--workers", "1")
    assert status == 0 and "up to date" in err
    assert snapshot(out) == before
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--valid-ratio", "0.3")
    assert status == 2 and "valid_ratio: 0.1" in err and "--force" in err
    assert snapshot(out) == before
    (src / "train" / "1.png").write_bytes((src / "train" / "2.png").read_bytes())  # the source changed
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out))
    assert status == 2 and "source" in err and "--force" in err
    assert snapshot(out) == before
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--valid-ratio", "0.3", "--force", "--workers", "1")
    assert status == 0, err
    assert data_prep.read_manifest(out)["valid_ratio"] == 0.3
    assert leftovers(out) == []


def test_concurrent_runs_share_the_lock(uneven, tmp_path):
    """Two `cifar10-hvd prepare` at once on one PREP (a retried Job): one builds, the other finds it done."""
    src, _ = uneven
    out = tmp_path / "prep"
    args = [str(Path(sys.executable).parent / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(out), "--workers", "1",
            "--classes", ",".join(UNEVEN)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(), cwd=ROOT)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    errs = [err for _, err in results]
    assert sum("prepared" in e for e in errs) == 1 and sum("up to date" in e for e in errs) == 1, errs
    assert data_prep.read_manifest(out)["splits"]["train_valid"]["count"] == sum(UNEVEN.values())
    assert leftovers(out) == []


def test_python_dash_m_and_missing_test_folder(tmp_path):
    src, out = tmp_path / "kaggle", tmp_path / "prep"
    write_source(src, {"a": 4, "b": 4}, n_test=1)
    for png in (src / "test").iterdir():
        png.unlink()
    (src / "test").rmdir()
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--data", str(src), "--out", str(out), "--workers", "1",
                           "--classes", "a,b"],
                          capture_output=True, text=True, env=tool_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no test/" in proc.stderr
    test = data_prep.open_split(out, "test")
    assert test.images.shape == (0, 32, 32, 3) and test.ids.shape == (0,)


def pack_like_kaggle(src: Path, tmp_path: Path) -> Path:
    """SRC's folders as Kaggle ships them: TMP/packed/{train,test}.7z + trainLabels.csv, and TMP/cifar-10.zip of those."""
    packed = tmp_path / "packed"
    packed.mkdir()
    seven_zip_folder(packed / "train.7z", src / "train", "train")
    seven_zip_folder(packed / "test.7z", src / "test", "test")
    (packed / "trainLabels.csv").write_bytes((src / "trainLabels.csv").read_bytes())
    zip_tree(tmp_path / "cifar-10.zip", packed)
    return packed


def test_archives_give_the_same_arrays(uneven, tmp_path, capsys):
    """The competition's zip of train.7z/test.7z, and a folder holding those .7z files, match the folders."""
    src, _ = uneven
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(tmp_path / "from_dir"), "--workers", "1")
    assert status == 0, err
    packed = pack_like_kaggle(src, tmp_path)
    hashes = []
    for name, data in (("from_dir", src), ("from_7z", packed), ("from_zip", tmp_path / "cifar-10.zip")):
        if name != "from_dir":
            status, err = prepare_cli(capsys, "--data", str(data), "--out", str(tmp_path / name), "--workers", "1")
            assert status == 0, err
        manifest = data_prep.read_manifest(tmp_path / name)
        hashes.append({f: e["sha256"] for f, e in manifest["files"].items()})
    assert hashes[0] == hashes[1] == hashes[2]
    assert data_prep.read_manifest(tmp_path / "from_zip")["source"]["kind"] == "zip"
    status, err = prepare_cli(capsys, "--data", str(tmp_path / "cifar-10.zip"), "--out", str(tmp_path / "from_zip"))
    assert status == 0 and "up to date" in err


def tree_digest(root: Path) -> dict[str, str]:
    """Each file under ROOT (relative path) -> sha256 of its bytes."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_three_input_forms_publish_byte_identical_dirs(uneven, tmp_path, capsys):
    """Folders, train.7z/test.7z and the zip (streamed, 2 workers) give the same arrays and the same layout."""
    src, _ = uneven
    packed = pack_like_kaggle(src, tmp_path)
    files, trees = [], []
    for name, data in (("from_dir", src), ("from_7z", packed), ("from_zip", tmp_path / "cifar-10.zip")):
        status, err = prepare_cli(capsys, "--data", str(data), "--out", str(tmp_path / name), "--workers", "2",
                                  "--layout", "folders", "--valid-ratio", "0.3")
        assert status == 0, err
        files.append({f: (e["sha256"], e["bytes"]) for f, e in data_prep.read_manifest(tmp_path / name)["files"].items()})
        trees.append(tree_digest(tmp_path / name / "train_valid_test"))
        assert not (tmp_path / name / ".scratch").exists() and leftovers(tmp_path / name) == []
    assert files[0] == files[1] == files[2]
    assert trees[0] == trees[1] == trees[2] and len(trees[0]) == 2 * sum(UNEVEN.values()) + 9


def test_folders_layout_matches_the_seed_tree(uneven, tmp_path, capsys):
    src, labels = uneven
    out = tmp_path / "prep"
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--layout", "folders", "--workers", "1")
    assert status == 0, err
    tree = out / "train_valid_test"
    classes = data_prep.read_manifest(out)["classes"]

    def listed(split: str) -> dict[str, set[int]]:
        return {d.name: {int(p.stem) for p in d.iterdir()} for d in (tree / split).iterdir()}

    for split in ("train", "valid", "train_valid"):
        opened = data_prep.open_split(out, split)
        expected: dict[str, set[int]] = {}
        for image_id, label in zip(opened.ids, opened.labels, strict=True):
            expected.setdefault(classes[label], set()).add(int(image_id))
        assert listed(split) == expected
    k = data_prep.read_manifest(out)["n_valid_per_label"]
    assert {name: len(ids) for name, ids in listed("valid").items()} == {name: k for name in UNEVEN}
    assert listed("test") == {"unknown": set(range(1, 10))}
    linked = tree / "train_valid" / labels[1] / "1.png"
    assert linked.stat().st_ino == (src / "train" / "1.png").stat().st_ino  # a hard link, not a copy


def test_demo_data_through_cifar10_hvd_prepare(demo_src, prepared):
    """The shared `prepared` fixture: `cifar10-hvd demo-data` then `cifar10-hvd prepare --workers 2`."""
    manifest = data_prep.read_manifest(prepared)
    assert manifest["splits"]["train_valid"]["count"] == 600
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["valid"]["count"] == 600
    assert data_prep.open_split(prepared, "test").ids.tolist() == list(range(1, 98))
    again = run_cli(["prepare", "--data", str(demo_src), "--out", str(prepared)], check=True)
    assert "up to date" in again.stderr


def test_pyspng_and_pillow_decode_identically(uneven, tmp_path, capsys, monkeypatch):
    """8-bit RGB goes through pyspng when installed; Pillow alone must give the same bytes."""
    src, _ = uneven
    assert prepare_cli(capsys, "--data", str(src), "--out", str(tmp_path / "fast"), "--workers", "1")[0] == 0
    monkeypatch.setattr(sys.modules["data_prep.decode"], "pyspng", None)
    assert prepare_cli(capsys, "--data", str(src), "--out", str(tmp_path / "pillow"), "--workers", "1")[0] == 0
    fast, pillow = (data_prep.read_manifest(tmp_path / name)["files"] for name in ("fast", "pillow"))
    assert fast == pillow


def test_leftovers_of_a_killed_run_are_removed(uneven, tmp_path, capsys):
    """A run killed mid-build leaves only a hidden temporary sibling; the next run clears it."""
    src, _ = uneven
    out = tmp_path / "prep"
    (tmp_path / ".prep.tmp-999999999-killed01").mkdir()  # the pid of a writer that is gone
    (tmp_path / ".prep.tmp-999999999-killed01" / "trainval_images.npy").write_bytes(b"half")
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--workers", "1")
    assert status == 0, err
    assert leftovers(out) == []
    (tmp_path / ".prep.old-999999999-killed01").mkdir()
    status, err = prepare_cli(capsys, "--data", str(src), "--out", str(out), "--workers", "1")
    assert status == 0 and "up to date" in err
    assert leftovers(out) == []
