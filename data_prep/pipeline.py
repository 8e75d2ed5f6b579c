"""The prepare pipeline: check the Kaggle download, decode it once, publish packed arrays (and optional folders)."""
from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_prep import store
from data_prep.archive import DISK_MARGIN_BYTES
from data_prep.config import PrepareConfig
from data_prep.decode import ROW_BYTES, SIDE, ChunkResult, decode_chunk
from data_prep.errors import PrepareError, offenders
from data_prep.labels import read_labels
from data_prep.layout import write_folders
from data_prep.publish import locked, publish, remove_leftovers, staging_dir
from data_prep.schema import from_mapping
from data_prep.source import Source, SourceTree, check_names, list_pngs, locate
from data_prep.split import Assignment, assign

CHUNK_ROWS = 512           # images per decode task: small enough to balance, large enough to amortize
PARAMS = ("valid_ratio", "seed", "layout")


def default_workers() -> int:
    """The cores this process may run on, capped by a cgroup CPU limit (a Kubernetes pod's `limits.cpu`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def prepare(src: str | Path, out: str | Path, valid_ratio: float = 0.1, seed: int = 0,
            workers: int | None = None, layout: str | None = None, force: bool = False) -> store.Manifest:
    """Validate SRC, decode it once into OUT (published by one rename) and return OUT's manifest.

    Same source and parameters as the existing OUT: nothing is done ("up to date"). Different ones:
    refused. FORCE rebuilds and replaces OUT whatever it holds. Any error leaves OUT exactly as it was.
    """
    # the validators of the `prepare:` section and of the CLI's flags (workers 0/None: all cores)
    from_mapping(PrepareConfig, {"valid_ratio": valid_ratio, "seed": seed, "workers": workers or 0,
                                 "layout": layout or "packed"}, "prepare()")
    layout = None if layout == "packed" else layout
    started = time.perf_counter()
    out = Path(os.path.abspath(out))
    params = {"valid_ratio": valid_ratio, "seed": seed, "layout": layout}
    source_path = Path(src).resolve()
    if out.resolve() == source_path or out.resolve() in source_path.parents:
        raise PrepareError(f"--out {out} would replace the source {source_path}; choose another PREP")
    source = locate(source_path)
    with locked(out):
        remove_leftovers(out)
        existing = _existing(out)
        if existing is not None and not force:
            changes = _changes(existing, params, source)
            if not changes:
                print(f"{out} is up to date (same source and parameters); nothing to do", file=sys.stderr)
                return existing
            raise PrepareError(offenders(f"{out} was prepared differently; pass --force to replace it", changes))
        if existing is None and os.path.lexists(out) and not force and not (out.is_dir() and not any(out.iterdir())):
            raise PrepareError(f"{out}: exists and is not a prepared directory (no valid {store.MANIFEST}); "
                               "pass --force to replace it")
        staged = staging_dir(out)
        try:
            manifest = _build(source, staged, params, workers or default_workers())
            publish(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    elapsed = time.perf_counter() - started
    splits = manifest["splits"]
    decoded = splits["train_valid"]["count"] + splits["test"]["count"]
    print(f"prepared {out}: {splits['train']['count']} train, {splits['valid']['count']} valid "
          f"({manifest['n_valid_per_label']} per class), {splits['test']['count']} test, "
          f"{len(manifest['classes'])} classes; {decoded} images in {elapsed:.1f} s "
          f"({decoded / max(elapsed, 1e-9):,.0f} images/s)", file=sys.stderr)
    return store.Manifest(manifest)


def _existing(out: Path) -> dict | None:
    """OUT's manifest if OUT is a complete prepared directory of this format, else None."""
    try:
        return store.read_manifest(out) if out.is_dir() else None
    except PrepareError:
        return None


def _changes(existing: dict, params: dict, source: Source) -> list[str]:
    """How the requested run differs from what OUT holds, one line per difference."""
    changes = [f"{key}: {existing.get(key)!r} in {store.MANIFEST}, {params[key]!r} requested"
               for key in PARAMS if existing.get(key) != params[key]]
    if existing.get("source", {}).get("fingerprint") != source.fingerprint:
        changes.append(f"source: {existing.get('source', {}).get('path')} (fingerprint "
                       f"{str(existing.get('source', {}).get('fingerprint'))[:12]}) differs from {source.path} "
                       f"(fingerprint {source.fingerprint[:12]})")
    return changes


def _build(source: Source, staged: Path, params: dict, workers: int) -> dict:
    """Everything short of publishing: check, split, decode, lay out, hash, write the manifest."""
    scratch = staged / ".scratch"
    tree = source.materialize(scratch)
    labels, train_files, test_files = _checked_files(source, tree)
    assignment = assign(labels, params["valid_ratio"], params["seed"])
    trainval_rows = assignment.valid + assignment.train
    # Plain strings, not Paths: 350,000 Path joins cost seconds.
    train_prefix = f"{tree.train_dir}{os.sep}"
    trainval_paths = [train_prefix + train_files[i] for i, _ in trainval_rows]
    test_ids = sorted(test_files)
    test_prefix = f"{tree.test_dir}{os.sep}"
    test_paths = [test_prefix + test_files[i] for i in test_ids]
    _check_disk(staged, len(trainval_paths) + len(test_paths), params["layout"], tree)

    np.save(staged / store.TRAINVAL_LABELS, np.asarray([c for _, c in trainval_rows], dtype=np.int64))
    np.save(staged / store.TRAINVAL_IDS, np.asarray([i for i, _ in trainval_rows], dtype=np.int64))
    np.save(staged / store.TEST_IDS, np.asarray(test_ids, dtype=np.int64))
    tasks = _tasks(staged / store.TRAINVAL_IMAGES, trainval_paths) + _tasks(staged / store.TEST_IMAGES, test_paths)
    # Each file is hashed in a thread as soon as its last row is written, overlapping the decoding.
    hasher = ThreadPoolExecutor(2, thread_name_prefix="sha256")
    try:
        digests = {name: hasher.submit(store.sha256_file, staged / name)
                   for name in (store.TRAINVAL_LABELS, store.TRAINVAL_IDS, store.TEST_IDS)}

        def written(npy: Path) -> None:
            digests[npy.name] = hasher.submit(store.sha256_file, npy)

        converted = _decode_all(tasks, workers, len(trainval_paths) + len(test_paths), written)
        for npy in (store.TRAINVAL_IMAGES, store.TEST_IMAGES):
            if npy not in digests:  # no rows, no tasks
                written(staged / npy)
        if converted:
            print(f"warning: {len(converted)} images were grayscale, RGBA or palette PNGs and were converted to RGB "
                  f"(first: {converted[0]})", file=sys.stderr)
        if params["layout"] == "folders":
            _write_folders(staged, assignment, trainval_rows, trainval_paths, test_paths)
        shutil.rmtree(scratch, ignore_errors=True)
        hashes = {name: digest.result() for name, digest in digests.items()}
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
    return _finish_manifest(staged, source, params, assignment, len(test_ids), len(converted), hashes)


def _checked_files(source: Source, tree: SourceTree) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
    """Labels cross-checked against train/, and the PNG names of train/ and test/ (id -> name).

    PrepareError on any mismatch or misnamed file.
    """
    rows = read_labels(tree.labels_csv)
    train_files, bad = list_pngs(tree.train_dir, source.listings.get(tree.train_dir))
    test_files: dict[int, str] = {}
    if tree.test_dir is not None:
        test_files, bad_test = list_pngs(tree.test_dir, source.listings.get(tree.test_dir))
        bad += bad_test
    else:
        print(f"warning: {tree.train_dir.parent} has no test/ (or test.7z); the test split will be empty",
              file=sys.stderr)
    check_names(tree.train_dir.parent, bad)
    problems = []
    no_png = [f"line {line}: id {i} ({label})" for i, (label, line) in rows.items() if i not in train_files]
    if no_png:
        problems.append(offenders(f"{tree.labels_csv}: labelled ids with no PNG in {tree.train_dir}", no_png))
    no_label = [f"{tree.train_dir / train_files[i]}" for i in sorted(train_files.keys() - rows.keys())]
    if no_label:
        problems.append(offenders(f"{tree.train_dir}: PNGs with no label in {tree.labels_csv}", no_label))
    if problems:
        raise PrepareError("\n".join(problems))
    labels = {i: label for i, (label, _) in rows.items()}
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise PrepareError(f"{tree.labels_csv}: {len(classes)} class ({', '.join(classes)}); need at least 2")
    return labels, train_files, test_files


def _check_disk(staged: Path, images: int, layout: str | None, tree: SourceTree) -> None:
    """Refuse before writing if the packed arrays (and copies the folder layout may need) cannot fit."""
    need = images * (ROW_BYTES + 16) + DISK_MARGIN_BYTES
    if layout == "folders" and tree.train_dir.stat().st_dev != staged.stat().st_dev:
        need += images * 8192  # hard links cannot cross devices: budget a copy of each (small) PNG
    free = shutil.disk_usage(staged).free
    if need > free:
        raise PrepareError(f"{staged.parent}: not enough disk space for the prepared data: "
                           f"need {need:,} bytes, {free:,} free")


def _tasks(npy: Path, paths: list[str]) -> list[tuple[str, int, int, list[str]]]:
    """Preallocate NPY for len(PATHS) images and cut the work into chunks of rows."""
    array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(paths), SIDE, SIDE, 3))
    offset = array.offset
    del array
    return [(str(npy), offset, start, paths[start:start + CHUNK_ROWS]) for start in range(0, len(paths), CHUNK_ROWS)]


def _decode_all(tasks: list, workers: int, total: int, written: Callable[[Path], None]) -> list[str]:
    """Run every decode task (in WORKERS processes), show progress; return the converted files.

    Calls WRITTEN(npy) once all of an .npy's rows are written. Raises PrepareError naming the
    unreadable files, in row order.
    """
    from tqdm import tqdm

    errors: list[str] = []
    converted: list[str] = []
    chunks_left = Counter(task[0] for task in tasks)
    with tqdm(total=total, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), desc="decode") as bar:
        for task, result in zip(tasks, _results(tasks, min(workers, max(len(tasks), 1))), strict=True):
            errors += result.errors
            converted += result.converted
            bar.update(result.rows)
            chunks_left[task[0]] -= 1
            if chunks_left[task[0]] == 0 and not errors:
                written(Path(task[0]))
    if errors:
        raise PrepareError(offenders("images that are not readable 32x32 PNGs", errors))
    return converted


def _results(tasks: list, workers: int) -> Iterator[ChunkResult]:
    """decode_chunk over TASKS in order: in this process for one worker, else a pool of fresh processes."""
    if workers <= 1:
        yield from map(decode_chunk, tasks)
        return
    # spawn, not fork: the caller may hold threads (MXNet, Horovod) that a fork would copy half-way.
    # An executor, not a Pool: a worker that dies (OOM) fails the run instead of hanging it.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(decode_chunk, tasks)


def _write_folders(staged: Path, assignment: Assignment, trainval_rows: list[tuple[int, int]],
                   trainval_paths: list[str], test_paths: list[str]) -> None:
    """The seed's train_valid_test/ tree inside STAGED, hard-linked to the source PNGs (rows: valid, then train)."""
    n_valid = len(assignment.valid)
    classes = assignment.classes

    def entries() -> Iterator[tuple[str, str, str]]:
        for row, ((_, label), path) in enumerate(zip(trainval_rows, trainval_paths, strict=True)):
            yield "train_valid", classes[label], path
            yield ("valid" if row < n_valid else "train"), classes[label], path
        for path in test_paths:
            yield "test", "unknown", path

    linked, copied = write_folders(staged / store.FOLDERS, entries())
    if copied:
        print(f"warning: {copied} of {linked + copied} files in {store.FOLDERS}/ were copied, "
              "not hard-linked (another device or no permission)", file=sys.stderr)


def _finish_manifest(staged: Path, source: Source, params: dict, assignment: Assignment, n_test: int,
                     n_converted: int, hashes: dict[str, str]) -> dict:
    """Write manifest.json, last."""
    n_classes = len(assignment.classes)
    per_class = {
        name: np.bincount([c for _, c in rows], minlength=n_classes).tolist()
        for name, rows in (("train", assignment.train), ("valid", assignment.valid))
    }
    files = [store.TRAINVAL_IMAGES, store.TRAINVAL_LABELS, store.TRAINVAL_IDS, store.TEST_IMAGES, store.TEST_IDS]
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "classes": assignment.classes,
        "image_shape": [SIDE, SIDE, 3],
        **params,
        "n_valid_per_label": assignment.n_valid_per_label,
        "splits": store.split_table(len(assignment.valid), len(assignment.train), n_test),
        "class_counts": per_class,
        "converted_to_rgb": n_converted,
        "source": {"path": str(source.path), "kind": source.kind, "fingerprint": source.fingerprint},
        "files": {name: {"sha256": hashes[name], "bytes": (staged / name).stat().st_size} for name in files},
    }
    store.write_manifest(staged, manifest)
    return manifest
