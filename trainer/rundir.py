"""The run directory's contract: every file a training run writes, with its reader, writer and validation.

Files (rank 0 alone writes RUN):
- config.json: the run's record (schema: trainer.config.RunRecord; read_run_config reads it raw).
- metrics.jsonl: one JSON object per epoch, appended and flushed to disk per epoch; on resume the log is cut
  back to the epochs before the resume point, so a rerun epoch appears once. trainer.curves draws
  curves.png from it.
- checkpoints/epoch-EEEE.{params,states,json}: one per completed epoch; the .json is written last, so a
  checkpoint without it is incomplete (the job died while writing it) and is ignored. The .states file is the
  optimizer's state as an MXNet NDArray file (arrays only: nothing in it is code, unlike MXNet's pickled
  Trainer.save_states); its counters and layout are in the .json, beside the sha256 and size of every other
  file of the checkpoint, which resume checks before it reads any of them (read_checkpoint).
- model-final.params: the Gluon parameters predict loads; and the export for inference elsewhere:
  model-symbol.json + model-0000.params, a graph from raw uint8 NHWC 32x32 RGB images to logits with the
  run's evaluation view inside it, described by model-meta.json; and model.onnx, the same graph as ONNX
  (trainer.onnx_export, written by the final phase when onnx is installed).
Every file but metrics.jsonl (appended) is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.errors import InputError
from contracts.files import atomic_write, atomic_write_text, remove_stale_temps
from data_prep.store import sha256_file

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CHECKPOINT_DIR = "checkpoints"
FINAL_PARAMS = "model-final.params"
META_VERSION = 1
MODEL_SYMBOL, MODEL_PARAMS, MODEL_META = "model-symbol.json", "model-0000.params", "model-meta.json"
INPUT_SHAPE = (32, 32, 3)
_NAME = re.compile(r"^epoch-(\d{4,})\.json$")
_FILE = re.compile(r"^epoch-\d{4,}\.[a-z]{1,16}$")  # a checkpoint file as its record may name it
MAX_RECORD_BYTES = 1 << 20  # a checkpoint's .json is a few KiB; anything far larger is not one
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)




def start(run_dir: str | Path) -> list[Path]:
    """Before a run writes RUN: remove the temporaries of writers that died (kill -9 mid-write); return them."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINT_DIR)



def holds_run(run_dir: str | Path) -> bool:
    """Whether RUN holds a run's output (metrics, a complete checkpoint or a final model): overwrite needs --resume."""
    run_dir = Path(run_dir)
    return (run_dir / METRICS).exists() or bool(list_checkpoints(run_dir)) or (run_dir / FINAL_PARAMS).exists()


# --- writing ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def writing(path: str | Path):
    """A full disk (or quota) while writing path: InputError naming path (exit 2), not a bare errno."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise InputError(f"{path}: {e.strerror}; the run's files before it are intact: free space on "
                          f"{Path(path).parent} and continue with --resume") from None


@contextlib.contextmanager
def mxnet_writes(path: str | Path):
    """An MXNet writer's short write (it reports no errno) while the device holding path has no room left: the
    OSError of a full disk, naming path. Checked before the partial file is removed."""
    import mxnet as mx

    try:
        yield
    except mx.base.MXNetError as e:
        if "Write incomplete" in str(e) and shutil.disk_usage(Path(path).parent).free < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def write_file(path: str | Path, write: Callable[[str], Any]) -> None:
    """atomic_write(path, write) under writing(path), MXNet's writers included (mxnet_writes)."""
    def guarded(tmp: str) -> None:
        with mxnet_writes(tmp):
            write(tmp)

    with writing(path):
        atomic_write(path, guarded)


def write_text(path: str | Path, text: str) -> None:
    """atomic_write_text(path, text) under writing(path)."""
    with writing(path):
        atomic_write_text(path, text)


# --- config.json --------------------------------------------------------------------------------------

def write_run_config(run_dir: str | Path, record_json: str) -> None:
    """RUN/config.json from the run record's JSON (trainer.config.RunRecord.to_json), published by rename."""
    write_text(Path(run_dir) / RUN_CONFIG, record_json)


def read_run_config(run_dir: str | Path) -> dict:
    """RUN/config.json as a dict (train config, classes, phase, world size, lr used, versions)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: no run config (is {run_dir} a trainer run directory?)") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from e


# --- metrics.jsonl ------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every complete record in RUN/metrics.jsonl, in file order (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: str | Path, before_epoch: int) -> list[dict]:
    """Keep only the records of epochs < before_epoch (atomically) and return them."""
    kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) < before_epoch]
    write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one epoch's record and make it durable."""
    with writing(Path(run_dir) / METRICS), open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- checkpoints --------------------------------------------------------------------------------------

def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, path of the .json marker), oldest first."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    found = []
    for p in ckdir.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_suffix(".params").exists() and p.with_suffix(".states").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_model_params(run_dir: str | Path) -> Path:
    """RUN/model-final.params, else the newest complete checkpoint's .params, else InputError."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL_PARAMS
    if final.exists():
        return final
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return ckpts[-1][1].with_suffix(".params")
    raise InputError(f"{run_dir}: no {FINAL_PARAMS} and no complete checkpoint in {run_dir / CHECKPOINT_DIR}")


def checkpoint_stem(run_dir: str | Path, epoch: int) -> Path:
    """RUN/checkpoints/epoch-EEEE: the path of epoch's checkpoint files, less their suffix."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch-{epoch:04d}"


def save_checkpoint(run_dir: str | Path, epoch: int, net, trainer, record: dict, keep: int,
                    extra: dict[str, Callable[[str], Any]] | None = None) -> Path:
    """Write epoch's params, optimizer state, `extra` files ({suffix: writer(path)}, e.g. the weight average)
    and last the marker .json (record, the optimizer's counters, each file's sha256 and size), each
    atomically; keep the newest `keep`.

    `epoch` is the number of completed epochs; resuming continues at that epoch index.
    """
    stem = checkpoint_stem(run_dir, epoch)
    stem.parent.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    optimizer: dict = {}

    def put(suffix: str, write: Callable[[str], Any]) -> None:
        path = stem.with_suffix(suffix)
        write_file(path, write)
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    put(".params", net.save_parameters)
    put(".states", lambda tmp: optimizer.update(save_optimizer_state(trainer, tmp)))
    for suffix, write in (extra or {}).items():
        put(suffix, write)
    write_text(stem.with_suffix(".json"),
               json.dumps({"epoch": epoch, **record, "optimizer": optimizer, "files": files}, indent=1))
    for _epoch, marker in list_checkpoints(run_dir)[:-keep]:
        # marker first: a half-deleted checkpoint must never look complete
        marker.unlink(missing_ok=True)
        for path in marker.parent.glob(marker.stem + ".*"):
            path.unlink(missing_ok=True)
    return stem


# --- reading a checkpoint back: verified first --------------------------------------------------------

class Damaged(Exception):
    """A checkpoint file that is missing, changed since its writer recorded it, or unreadable (named)."""


@dataclass
class Checkpoint:
    """A checkpoint whose files all match their record: its epoch, file stem, record and optimizer arrays."""

    epoch: int
    stem: Path
    record: dict
    states: dict

    def path(self, suffix: str) -> Path:
        return self.stem.with_suffix(suffix)


def _markers(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint record (epoch-EEEE.json), oldest first, whatever else is beside it."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckdir.iterdir() if (m := _NAME.match(p.name)))


def _read_record(marker: Path) -> dict:
    """The checkpoint's .json, bounded, with its table of files; Damaged otherwise."""
    try:
        if not marker.is_file() or marker.stat().st_size > MAX_RECORD_BYTES:
            raise Damaged(f"{marker}: not a checkpoint record (a regular file of at most {MAX_RECORD_BYTES} bytes)")
        record = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Damaged(f"{marker}: unreadable checkpoint record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise Damaged(f"{marker}: no sha256 of the checkpoint's files in it (written by an older cifar10-hvd, "
                      "whose optimizer state is a pickle, or damaged); it is not loaded")
    return record


def _verify_file(path: Path, entry: Any) -> None:
    """path is a regular file of the size and sha256 its record gives; Damaged naming it otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or type(entry.get("bytes")) is not int:
        raise Damaged(f"{path}: its checkpoint record gives no sha256 and size for it")
    if not path.is_file():
        raise Damaged(f"{path}: missing, or not a regular file")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise Damaged(f"{path}: {size} bytes, its checkpoint record says {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        raise Damaged(f"{path}: sha256 differs from its checkpoint record (the file changed after it was written)")


def _load_arrays(path: Path) -> dict:
    """The named arrays of an NDArray file (mx.nd.load parses arrays; it runs nothing); Damaged otherwise."""
    import mxnet as mx

    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as e:
        raise Damaged(f"{path}: not an MXNet NDArray file ({str(e).strip().splitlines()[-1][:200]})") from None
    if loaded == []:
        return {}
    if not isinstance(loaded, dict):
        raise Damaged(f"{path}: holds unnamed arrays, not an optimizer state")
    return loaded


def read_checkpoint(marker: Path) -> Checkpoint:
    """The checkpoint whose record is marker, every file it lists checked against its sha256 before any is
    read, and its optimizer state loaded; Damaged naming the first file that is not as its writer left it."""
    record = _read_record(marker)
    stem = marker.with_suffix("")
    files = record["files"]
    for suffix in (".params", ".states"):
        if stem.with_suffix(suffix).name not in files:
            raise Damaged(f"{stem.with_suffix(suffix)}: not listed in its checkpoint record {marker.name}")
    for name, entry in files.items():
        if not (_FILE.match(name) and name.startswith(stem.name + ".")):
            raise Damaged(f"{marker}: lists a file that is not one of this checkpoint's: {name[:80]!r}")
        _verify_file(marker.parent / name, entry)
    epoch = int(_NAME.match(marker.name).group(1))
    if record.get("epoch") != epoch or not isinstance(record.get("optimizer"), dict):
        raise Damaged(f"{marker}: its epoch or optimizer entry does not match the file's name")
    return Checkpoint(epoch, stem, record, _load_arrays(stem.with_suffix(".states")))


def intact_checkpoint(run_dir: str | Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint whose files all match their record (or None), and why each newer one was passed over."""
    damaged = []
    for _epoch, marker in reversed(_markers(run_dir)):
        try:
            return read_checkpoint(marker), damaged
        except Damaged as e:
            damaged.append(str(e))
    return None, damaged


# --- the optimizer's state ----------------------------------------------------------------------------

def _updater(trainer):
    """The trainer's one updater (one device per rank, no kvstore updates), initialised as MXNet's own
    Trainer.save_states/load_states do first."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._update_on_kvstore or len(trainer._updaters) != 1:
        raise RuntimeError("optimizer state: expected one updater per rank, outside the kvstore")
    return trainer._updaters[0]


def _flatten(state: Any, key: str, arrays: dict) -> Any:
    """state's layout (None, "array", or a list of layouts), its arrays put in arrays as key, key.0, key.1 ..."""
    import mxnet as mx

    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        arrays[key] = state
        return "array"
    if isinstance(state, (tuple, list)):
        return [_flatten(part, f"{key}.{j}", arrays) for j, part in enumerate(state)]
    raise TypeError(f"optimizer state of type {type(state).__name__} has no file format")


def flat_state(states: dict[int, Any]) -> tuple[dict, dict]:
    """(named arrays, layout by index) of an updater's states."""
    arrays: dict = {}
    return arrays, {str(i): _flatten(s, str(i), arrays) for i, s in sorted(states.items())}


def save_optimizer_state(trainer, path: str) -> dict:
    """Write the trainer's optimizer state arrays to path as an NDArray file; return the counters and the
    layout that go into the checkpoint's record."""
    import mxnet as mx

    updater = _updater(trainer)
    arrays, layout = flat_state(updater.states)
    mx.nd.save(path, arrays)
    opt = updater.optimizer
    return {"num_update": int(opt.num_update), "layout": layout,
            "update_counts": {str(i): int(n) for i, n in sorted(opt._index_update_count.items())}}


def fresh_optimizer_state(trainer) -> dict[int, Any]:
    """A new state for every trainable parameter, as the optimizer's first update would make it."""
    opt = _updater(trainer).optimizer
    return {i: opt.create_state_multi_precision(i, p.list_data()[0])
            for i, p in enumerate(trainer._params) if p.grad_req != "null"}


def fill_optimizer_state(states: dict[int, Any], ck: Checkpoint) -> tuple[int, dict[int, int]]:
    """Copy ck's optimizer state into states (fresh_optimizer_state's; the indices it has no state for, never
    updated, are dropped) and return its (num_update, per-index update counts); InputError naming the
    .states file when it does not fit this model and optimizer."""
    path = ck.path(".states")
    saved = ck.record["optimizer"]
    layout, counts = saved.get("layout"), saved.get("update_counts")
    fits = isinstance(layout, dict) and isinstance(counts, dict) and set(layout) <= {str(i) for i in states}
    if fits:
        for i in [i for i in states if str(i) not in layout]:
            del states[i]
        arrays, mine = flat_state(states)
        fits = layout == mine and set(ck.states) == set(arrays) and all(
            ck.states[k].shape == a.shape and ck.states[k].dtype == a.dtype for k, a in arrays.items()) and all(
            k in layout and type(n) is int and n >= 0 for k, n in counts.items())
    if not fits:
        raise InputError(f"{path}: the optimizer state does not fit this model and optimizer "
                          "(another width, momentum or optimizer than the run's?)")
    for key, a in arrays.items():
        ck.states[key].copyto(a)
    num_update = saved.get("num_update")
    return (num_update if type(num_update) is int and num_update >= 0 else 0), {int(k): n for k, n in counts.items()}


def install_optimizer_state(trainer, states: dict[int, Any], num_update: int, counts: dict[int, int]) -> None:
    """Make states and counters the trainer's optimizer state, as if its optimizer had made them."""
    updater = _updater(trainer)
    updater.states = dict(states)
    updater.states_synced = dict.fromkeys(states, True)
    opt = updater.optimizer
    device = trainer._contexts[0].device_id  # the Updater selects its counters by the weights' device
    opt._all_index_update_counts = {device: dict(counts)}
    opt._index_update_count = opt._all_index_update_counts[device]
    opt.num_update = num_update


def load_optimizer_state(trainer, ck: Checkpoint) -> None:
    """ck's optimizer state into trainer (one process; train.py shares rank 0's with the other ranks)."""
    states = fresh_optimizer_state(trainer)
    install_optimizer_state(trainer, states, *fill_optimizer_state(states, ck))
