"""The prepare pipeline: check the Kaggle download, decode it once, publish packed arrays (and optional folders)."""
from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.errors import InputError, offenders
from contracts.labels import check_classes, read_labels, read_table
from data_prep import store
from data_prep.archive import DISK_MARGIN_BYTES
from data_prep.config import PrepareConfig
from data_prep.decode import MAX_PNG_BYTES, ROW_BYTES, SIDE, ChunkResult, decode_chunk, die_with_parent
from data_prep.layout import write_folders
from data_prep.progress import Progress
from data_prep.publish import build_dir, discard_build, locked, publish, remove_leftovers, sigterm_raises
from data_prep.source import Part, Source, SourceTree, check_names, list_pngs, locate
from data_prep.split import Assignment, assign

STREAM_WORKER_NICENESS = 5  # decode workers yield to the LZMA core when a machine is contended
CHUNK_ROWS = 512           # images per decode task: small enough to balance, large enough to amortize
PARAMS = ("valid_ratio", "seed", "layout", "classes")  # the keys of PrepareConfig a manifest records


def recorded(cfg: PrepareConfig) -> dict:
    """PARAMS as the manifest records them: the packed layout as null, the classes sorted."""
    return {"valid_ratio": cfg.valid_ratio, "seed": cfg.seed, "layout": None if cfg.layout == "packed" else cfg.layout,
            "classes": cfg.class_names()}


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


def prepare(src: str | Path, out: str | Path, cfg: PrepareConfig, *, force: bool = False) -> store.Manifest:
    """Validate SRC, decode it once into OUT (published by one rename) and return OUT's manifest.

    CFG is a PrepareConfig the schema has validated (contracts.schema.resolve or from_mapping): its
    classes are the labels trainLabels.csv must use, each on at least one row; workers 0 means all cores.

    Same source and parameters as the existing OUT: nothing is done ("up to date"). Different ones:
    refused. FORCE rebuilds and replaces OUT, but only a directory holding this project's manifest;
    OUT may never be, hold or lie inside SRC. Any error (disk full included) leaves OUT exactly as it was.
    """
    started = time.perf_counter()
    out = Path(os.path.abspath(out))
    source_path = Path(src).resolve()
    _check_out_apart(out, source_path)
    source = locate(source_path)
    with locked(out):
        remove_leftovers(out)
        existing = _existing(out)
        if existing is not None and not force:
            changes = _changes(existing, recorded(cfg), source)
            if not changes:
                print(f"{out} is up to date (same source and parameters); nothing to do", file=sys.stderr)
                return existing
            raise InputError(offenders(f"{out} was prepared differently; pass --force to replace it", changes))
        if existing is None and os.path.lexists(out) and not (out.is_dir() and not any(out.iterdir())):
            _check_replaceable(out, force)
        with sigterm_raises():
            try:
                built = build_dir(out)
                manifest = _build(source, built, cfg)
                publish(built, out)
            except BaseException as exc:
                discard_build(out)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    what = f" (writing {Path(exc.filename).name})" if exc.filename else ""
                    raise InputError(f"{out}: {exc.strerror}{what}; {out} was left as it was, nothing half-written "
                                       f"remains: free space on {out.parent} and run again") from None
                raise
    elapsed = time.perf_counter() - started
    splits = manifest["splits"]
    decoded = splits["train_valid"]["count"] + splits["test"]["count"]
    print(f"prepared {out}: {splits['train']['count']} train, {splits['valid']['count']} valid "
          f"({manifest['n_valid_per_label']} per class), {splits['test']['count']} test, "
          f"{len(manifest['classes'])} classes; {decoded} images in {elapsed:.1f} s "
          f"({decoded / max(elapsed, 1e-9):,.0f} images/s)", file=sys.stderr)
    return store.Manifest(manifest)


def _check_out_apart(out: Path, source: Path) -> None:
    """OUT may not be the source, hold it, or lie inside it (with or without --force)."""
    resolved = out.resolve()
    if resolved == source or resolved in source.parents:
        raise InputError(f"--out {out} would replace the source {source}; choose another PREP")
    if source in resolved.parents:
        raise InputError(f"--out {out} is inside the source {source}; choose a PREP outside it")


def _check_replaceable(out: Path, force: bool) -> None:
    """OUT exists and is not a valid prepared directory: --force may replace it only if it holds our manifest."""
    try:
        ours = "format_version" in json.loads((out / store.MANIFEST).read_bytes())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise InputError(f"{out}: exists and is not a prepared directory (no {store.MANIFEST} of this project); "
                           "prepare replaces only what it wrote, even with --force: choose another PREP")
    if not force:
        raise InputError(f"{out}: exists and is not a prepared directory (no valid {store.MANIFEST}); "
                           "pass --force to replace it")


def _existing(out: Path) -> dict | None:
    """OUT's manifest if OUT is a complete prepared directory of this format, else None."""
    try:
        return store.read_manifest(out) if out.is_dir() else None
    except InputError:
        return None


def _changes(existing: dict, requested: dict, source: Source) -> list[str]:
    """How the requested run (REQUESTED: recorded(cfg)) differs from what OUT holds, one line per difference."""
    changes = [f"{key}: {existing.get(key)!r} in {store.MANIFEST}, {requested[key]!r} requested"
               for key in PARAMS if existing.get(key) != requested[key]]
    if existing.get("source", {}).get("fingerprint") != source.fingerprint:
        changes.append(f"source: {existing.get('source', {}).get('path')} (fingerprint "
                       f"{str(existing.get('source', {}).get('fingerprint'))[:12]}) differs from {source.path} "
                       f"(fingerprint {source.fingerprint[:12]})")
    return changes


@dataclass
class Job:
    """One part decoded into one .npy: each PNG name's row, and its layout copies (archives, --layout folders)."""

    part: Part
    npy: Path
    rows: dict[str, int]  # in row order
    copies: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _build(source: Source, built: Path, cfg: PrepareConfig) -> dict:
    """Everything short of publishing: check, split, decode, lay out, hash, write the manifest."""
    scratch = built / ".scratch"
    folders = cfg.layout == "folders"
    with ExitStack() as stack:
        tree = source.materialize(scratch, stack)
        labels, train_files, test_files = _checked_files(tree, cfg.class_names())
        assignment = assign(labels, cfg)
        trainval_rows = assignment.valid + assignment.train
        test_ids = sorted(test_files)
        _check_disk(built, len(trainval_rows) + len(test_ids), folders, tree)
        np.save(built / store.TRAINVAL_LABELS, np.asarray([c for _, c in trainval_rows], dtype=np.int64))
        np.save(built / store.TRAINVAL_IDS, np.asarray([i for i, _ in trainval_rows], dtype=np.int64))
        np.save(built / store.TEST_IDS, np.asarray(test_ids, dtype=np.int64))
        jobs = [Job(tree.train, built / store.TRAINVAL_IMAGES, {train_files[i]: row for row, (i, _) in enumerate(trainval_rows)})]
        if tree.test is not None:
            jobs.append(Job(tree.test, built / store.TEST_IMAGES, {test_files[i]: row for row, i in enumerate(test_ids)}))
        if folders and tree.train.folder is None:
            _plan_copies(built / store.FOLDERS, jobs, assignment, trainval_rows)
        hashes, converted = _decode_and_hash(built, jobs, cfg.workers or default_workers())
        if folders and tree.train.folder is not None:
            _write_folders(built, assignment, trainval_rows, jobs)
    shutil.rmtree(scratch, ignore_errors=True)
    return _finish_manifest(built, source, cfg, assignment, len(test_ids), len(converted), hashes)


def _decode_and_hash(built: Path, jobs: list[Job], workers: int) -> tuple[dict[str, str], list[str]]:
    """Decode every job; each file is hashed in a thread as soon as its last row is written."""
    hasher = ThreadPoolExecutor(2, thread_name_prefix="sha256")
    try:
        digests = {name: hasher.submit(store.sha256_file, built / name)
                   for name in (store.TRAINVAL_LABELS, store.TRAINVAL_IDS, store.TEST_IDS)}

        def written(npy: Path) -> None:
            digests[npy.name] = hasher.submit(store.sha256_file, npy)

        converted = _decode_all(jobs, workers, written)
        for npy in (store.TRAINVAL_IMAGES, store.TEST_IMAGES):
            if npy not in digests:  # no test part: an empty array
                _preallocate(built / npy, 0)
                written(built / npy)
        if converted:
            print(f"warning: {len(converted)} images were grayscale, RGBA or palette PNGs and were converted to RGB "
                  f"(first: {converted[0]})", file=sys.stderr)
        return {name: digest.result() for name, digest in digests.items()}, converted
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)


def _checked_files(tree: SourceTree, classes: list[str]) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
    """Labels cross-checked against train/ and CLASSES, and the PNG names of train/ and test/ (id -> name).

    InputError on any mismatch or misnamed file.
    """
    rows = read_labels(tree.labels_csv)
    train_dir = tree.train.shown
    train_files, bad = list_pngs(train_dir, tree.train.names)
    test_files: dict[int, str] = {}
    if tree.test is not None:
        test_files, bad_test = list_pngs(tree.test.shown, tree.test.names)
        bad += bad_test
    else:
        print(f"warning: {train_dir.parent} has no test/ (or test.7z); the test split will be empty",
              file=sys.stderr)
    check_names(train_dir.parent, bad)
    problems = []
    no_png = [f"line {line}: id {i} ({label})" for i, (label, line) in rows.items() if i not in train_files]
    if no_png:
        problems.append(offenders(f"{tree.labels_csv}: labelled ids with no PNG in {train_dir}", no_png))
    no_label = [f"{train_dir / train_files[i]}" for i in sorted(train_files.keys() - rows.keys())]
    if no_label:
        problems.append(offenders(f"{train_dir}: PNGs with no label in {tree.labels_csv}", no_label))
    if problems:
        raise InputError("\n".join(problems))
    labels = {i: label for i, (label, _) in rows.items()}
    found = sorted(set(labels.values()))
    if len(found) < 2 and set(found) <= set(classes):
        raise InputError(f"{tree.labels_csv}: {len(found)} class ({', '.join(found)}); need at least 2")
    check_classes(tree.shown(tree.labels_csv), rows, classes)
    if tree.test is not None and tree.sample_csv is not None:
        _check_test_ids(tree, test_files)
    return labels, train_files, test_files


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'' if n == 1 else 's'}"


def _check_test_ids(tree: SourceTree, test_files: dict[int, str]) -> None:
    """The test PNGs are exactly the ids sampleSubmission.csv lists (a submission must hold every one of them)."""
    sample, shown = tree.sample_csv, tree.shown(tree.sample_csv)
    table = read_table(sample)
    listed = dict(zip(table.ids.tolist(), table.lines.tolist(), strict=True))
    problems = []
    missing = sorted(listed.keys() - test_files.keys())
    if missing:
        problems.append(f"{shown}: {_count(len(missing), 'test id')} without a PNG in {tree.test.shown} "
                        f"(first: id {missing[0]}, line {listed[missing[0]]})")
    extra = sorted(test_files.keys() - listed.keys())
    if extra:
        problems.append(f"{tree.test.shown}: {_count(len(extra), 'test PNG')} whose id is not in {shown} "
                        f"(first: {test_files[extra[0]]})")
    if problems:
        raise InputError("\n".join(problems))


def _check_disk(built: Path, images: int, folders: bool, tree: SourceTree) -> None:
    """Refuse before writing if the packed arrays (and copies the folder layout may need) cannot fit."""
    need = images * (ROW_BYTES + 16) + DISK_MARGIN_BYTES
    folder = tree.train.folder
    if folders and (folder is None or folder.stat().st_dev != built.stat().st_dev):
        need += images * 8192  # no hard links from an archive or across devices: budget a copy of each (small) PNG
    free = shutil.disk_usage(built).free
    if need > free:
        raise InputError(f"{built.parent}: not enough disk space for the prepared data: "
                           f"need {need:,} bytes, {free:,} free")


def _preallocate(npy: Path, rows: int) -> int:
    """Create NPY for ROWS images (sparse until written); return the offset of its data."""
    array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(rows, SIDE, SIDE, 3))
    offset = array.offset
    del array
    return offset


def _tasks(job: Job) -> Iterator[tuple[str, int, int, list]]:
    """Preallocate JOB's .npy, then cut its items (in row order for a folder, archive order for an archive) into chunks."""
    offset = _preallocate(job.npy, len(job.rows))
    chunk: list = []
    for item in _items(job):
        chunk.append(item)
        if len(chunk) == CHUNK_ROWS:
            yield str(job.npy), offset, chunk[0][0], chunk
            chunk = []
    if chunk:
        yield str(job.npy), offset, chunk[0][0], chunk


def _items(job: Job) -> Iterator[tuple[int, str, str | bytes | None, tuple[str, ...]]]:
    """(row, name shown in messages, path or bytes, layout copies) for each of JOB's PNGs."""
    part, prefix = job.part, f"{job.part.shown}{os.sep}"
    if part.stream is None:
        for name, row in job.rows.items():
            yield row, prefix + name, prefix + name, ()
        return
    seen: set[str] = set()
    for name, data in part.stream(set(job.rows), MAX_PNG_BYTES):
        if name in seen:
            raise InputError(f"{part.shown}: unpacking failed (member {name!r} appears twice)")
        seen.add(name)
        yield job.rows[name], prefix + name, data, job.copies.get(name, ())
    if len(seen) != len(job.rows):
        missing = sorted(job.rows.keys() - seen)
        raise InputError(f"{part.shown}: unpacking failed (the archive ended without {len(missing)} of its "
                           f"listed PNGs, first {missing[0]!r})")


def _decode_all(jobs: list[Job], workers: int, written: Callable[[Path], None]) -> list[str]:
    """Run every job's decode tasks (in WORKERS processes) with a progress per part; return the converted files.

    Calls WRITTEN(npy) once all of an .npy's rows are written. Raises InputError naming the
    unreadable files, in row order.
    """
    errors: list[tuple[int, int, str]] = []
    converted: list[str] = []
    streamed = any(job.part.stream is not None for job in jobs)
    with _runner(workers, STREAM_WORKER_NICENESS if streamed else 0) as run:
        for index, job in enumerate(jobs):
            progress = Progress(str(job.part.shown), len(job.rows), job.part.packed_bytes)
            try:
                for result in run(_tasks(job)):
                    errors += [(index, row, message) for row, message in result.errors]
                    converted += result.converted
                    progress.update(result.rows)
            finally:
                progress.close()
            if not errors:
                written(job.npy)
    if errors:
        raise InputError(offenders("images that are not readable 32x32 PNGs", [m for *_, m in sorted(errors)]))
    return converted


@contextmanager
def _runner(workers: int, niceness: int = 0) -> Iterator[Callable[[Iterator], Iterator[ChunkResult]]]:
    """A function mapping decode_chunk over tasks in order: in this process for one worker, else in a pool.

    At most 2 x WORKERS tasks are in flight, so memory stays a few chunks of PNGs whatever the archive size.
    spawn, not fork: the caller may hold threads (MXNet, Horovod) that a fork would copy half-way.
    An executor, not a Pool: a worker that dies (OOM) fails the run instead of hanging it.
    Workers die with this process (die_with_parent), even when it is SIGKILLed. NICENESS lowers the workers'
    priority: when an archive streams, this process's LZMA is the critical path and the workers have slack.
    """
    if workers <= 1:
        yield lambda tasks: map(decode_chunk, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(), niceness)) as pool:
        def run(tasks: Iterator) -> Iterator[ChunkResult]:
            pending: deque = deque()
            for task in tasks:
                pending.append(pool.submit(decode_chunk, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        yield run


def _plan_copies(root: Path, jobs: list[Job], assignment: Assignment, trainval_rows: list[tuple[int, int]]) -> None:
    """For archives with --layout folders: where each PNG's bytes go in the d2l chapter's tree (folders made now)."""
    classes, n_valid = assignment.classes, len(assignment.valid)
    for split in ("train_valid", "train", "valid"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    train = jobs[0]
    for name, row in train.rows.items():
        label = classes[trainval_rows[row][1]]
        train.copies[name] = (f"{root}/train_valid/{label}/{name}",
                              f"{root}/{'valid' if row < n_valid else 'train'}/{label}/{name}")
    if len(jobs) > 1:
        (root / "test" / "unknown").mkdir(parents=True, exist_ok=True)
        jobs[1].copies.update({name: (f"{root}/test/unknown/{name}",) for name in jobs[1].rows})


def _write_folders(built: Path, assignment: Assignment, trainval_rows: list[tuple[int, int]], jobs: list[Job]) -> None:
    """The d2l chapter's train_valid_test/ tree inside BUILT, hard-linked to the source PNGs (rows: valid, then train)."""
    n_valid = len(assignment.valid)
    classes = assignment.classes
    train_prefix = f"{jobs[0].part.shown}{os.sep}"

    def entries() -> Iterator[tuple[str, str, str]]:
        for (name, row), (_, label) in zip(jobs[0].rows.items(), trainval_rows, strict=True):
            yield "train_valid", classes[label], train_prefix + name
            yield ("valid" if row < n_valid else "train"), classes[label], train_prefix + name
        for job in jobs[1:]:
            test_prefix = f"{job.part.shown}{os.sep}"
            for name in job.rows:
                yield "test", "unknown", test_prefix + name

    linked, copied = write_folders(built / store.FOLDERS, entries())
    if copied:
        print(f"warning: {copied} of {linked + copied} files in {store.FOLDERS}/ were copied, "
              "not hard-linked (another device or no permission)", file=sys.stderr)


def _finish_manifest(built: Path, source: Source, cfg: PrepareConfig, assignment: Assignment, n_test: int,
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
        **recorded(cfg),
        "n_valid_per_label": assignment.n_valid_per_label,
        "splits": store.split_table(len(assignment.valid), len(assignment.train), n_test),
        "class_counts": per_class,
        "converted_to_rgb": n_converted,
        "source": {"path": str(source.path), "kind": source.kind, "fingerprint": source.fingerprint},
        "files": {name: {"sha256": hashes[name], "bytes": (built / name).stat().st_size} for name in files},
    }
    store.write_manifest(built, manifest)
    return manifest
