"""The run directory's contract: every file a training run writes, with its reader, writer and validation.

Files (rank 0 alone writes RUN):
- config.json: the run's record (schema: trainer.config.RunRecord; read_run_config reads it raw).
- metrics.jsonl: one JSON object per epoch, appended and flushed to disk per epoch; on resume the log is cut
  back to the epochs before the resume point, so a rerun epoch appears once. trainer.curves draws
  curves.png from it.
- checkpoints/epoch-EEEE.{params,states,json}: one per completed epoch; the .json is written last, so a
  checkpoint without it is incomplete (the job died while writing it) and is ignored.
- model-final.params: the Gluon parameters predict loads; and the export for inference elsewhere:
  model-symbol.json + model-0000.params, a graph from raw uint8 NHWC 32x32 RGB images to logits with the
  run's evaluation view inside it, described by model-meta.json.
Every file but metrics.jsonl (appended) is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.errors import InputError
from data_prep.files import atomic_write, atomic_write_text, remove_stale_temps

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CHECKPOINT_DIR = "checkpoints"
FINAL_PARAMS = "model-final.params"
META_VERSION = 1
MODEL_SYMBOL, MODEL_PARAMS, MODEL_META = "model-symbol.json", "model-0000.params", "model-meta.json"
INPUT_SHAPE = (32, 32, 3)
_NAME = re.compile(r"^epoch-(\d{4,})\.json$")


RunDirError = InputError  # a run directory lacks what was asked of it; the message names the path (exit 2)


def start(run_dir: str | Path) -> list[Path]:
    """Before a run writes RUN: remove the temporaries of writers that died (kill -9 mid-write); return them."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINT_DIR)



def holds_run(run_dir: str | Path) -> bool:
    """Whether RUN holds a run's output (metrics, a complete checkpoint or a final model): overwrite needs --resume."""
    run_dir = Path(run_dir)
    return (run_dir / METRICS).exists() or bool(list_checkpoints(run_dir)) or (run_dir / FINAL_PARAMS).exists()


# --- config.json --------------------------------------------------------------------------------------

def write_run_config(run_dir: str | Path, record_json: str) -> None:
    """RUN/config.json from the run record's JSON (trainer.config.RunRecord.to_json), published by rename."""
    atomic_write_text(Path(run_dir) / RUN_CONFIG, record_json)


def read_run_config(run_dir: str | Path) -> dict:
    """RUN/config.json as a dict (train config, classes, phase, world size, lr used, versions)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RunDirError(f"{path}: no run config (is {run_dir} a trainer run directory?)") from e
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON: {e}") from e


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
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one epoch's record and make it durable."""
    with open(Path(run_dir) / METRICS, "a") as f:
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


def latest_checkpoint(run_dir: str | Path) -> dict | None:
    """The newest complete checkpoint's record (epoch, paths, saved state), or None."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    epoch, marker = ckpts[-1]
    record = json.loads(marker.read_text())
    record["params_path"] = str(marker.with_suffix(".params"))
    record["states_path"] = str(marker.with_suffix(".states"))
    return record


def find_model_params(run_dir: str | Path) -> Path:
    """RUN/model-final.params, else the newest complete checkpoint's .params, else RunDirError."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL_PARAMS
    if final.exists():
        return final
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return ckpts[-1][1].with_suffix(".params")
    raise RunDirError(f"{run_dir}: no {FINAL_PARAMS} and no complete checkpoint in {run_dir / CHECKPOINT_DIR}")


def checkpoint_stem(run_dir: str | Path, epoch: int) -> Path:
    """RUN/checkpoints/epoch-EEEE: the path of epoch's checkpoint files, less their suffix."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch-{epoch:04d}"


def save_checkpoint(run_dir: str | Path, epoch: int, net, trainer, record: dict, keep: int,
                    extra: dict[str, Callable[[str], Any]] | None = None) -> Path:
    """Write epoch's params, optimizer states, `extra` files ({suffix: writer(path)}, e.g. the weight average)
    and the marker .json atomically; keep the newest `keep`.

    `epoch` is the number of completed epochs; resuming continues at that epoch index.
    """
    stem = checkpoint_stem(run_dir, epoch)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_suffix(".params"), net.save_parameters)
    atomic_write(stem.with_suffix(".states"), trainer.save_states)
    for suffix, write in (extra or {}).items():
        atomic_write(stem.with_suffix(suffix), write)
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"epoch": epoch, **record}, indent=1))
    for _epoch, marker in list_checkpoints(run_dir)[:-keep]:
        # marker first: a half-deleted checkpoint must never look complete
        marker.unlink(missing_ok=True)
        for path in marker.parent.glob(marker.stem + ".*"):
            path.unlink(missing_ok=True)
    return stem


# --- the final model and its export -------------------------------------------------------------------

def _raw_image_block(net, crop: int):
    """net behind the evaluation view (trainer.presets.eval_transform): uint8 NHWC in, the `crop` resample
    and the normalization as graph constants, logits out."""
    import mxnet as mx
    from mxnet import gluon

    from trainer.presets import _SCALE, _SHIFT, INDEX, RESIZE, ROWS

    class RawImages(gluon.HybridBlock):
        def __init__(self):
            super().__init__(prefix="eval_view_")
            with self.name_scope():
                self.scale = self.params.get_constant("scale", mx.nd.array(_SCALE.reshape(1, 3, 1, 1)))
                self.shift = self.params.get_constant("shift", mx.nd.array(_SHIFT.reshape(1, 3, 1, 1)))
                if crop:
                    self.resample = self.params.get_constant("resample",
                                                             mx.nd.array(ROWS[INDEX[crop, (RESIZE - crop) // 2]]))
            self.net = net

        def hybrid_forward(self, F, x, scale, shift, resample=None):
            x = F.transpose(F.cast(x, "float32"), axes=(0, 3, 1, 2))
            if crop:  # A @ x @ A.T per channel: columns, then rows through a swap
                x = F.dot(x, resample, transpose_b=True)
                x = F.swapaxes(F.dot(F.swapaxes(x, 2, 3), resample, transpose_b=True), 2, 3)
            return self.net(F.broadcast_add(F.broadcast_mul(x, scale), shift))

    return RawImages()


def write_final_model(run_dir: str | Path, net, classes: list[str], crop: int) -> None:
    """RUN/model-final.params, then the self-contained export and model-meta.json, each published by rename."""
    import mxnet as mx

    from trainer.presets import MEAN, STD

    run_dir = Path(run_dir)
    atomic_write(run_dir / FINAL_PARAMS, net.save_parameters)
    ctx = next(iter(net.collect_params().values())).list_ctx()[0]
    block = _raw_image_block(net, crop)
    block.collect_params("eval_view_.*").initialize(ctx=ctx)
    block.hybridize()
    block(mx.nd.zeros((1, *INPUT_SHAPE), dtype="uint8", ctx=ctx))
    tmp = run_dir / f".export.tmp{os.getpid()}"
    tmp.mkdir()
    block.export(str(tmp / "model"))
    for name in (MODEL_SYMBOL, MODEL_PARAMS):
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
    meta = {"version": META_VERSION, "symbol": MODEL_SYMBOL, "params": MODEL_PARAMS, "classes": list(classes),
            "input": {"name": "data", "dtype": "uint8", "layout": "NHWC", "shape": [None, *INPUT_SHAPE],
                      "channels": "RGB", "range": [0, 255]},
            "output": {"shape": [None, len(classes)], "meaning": "logits; argmax indexes classes"},
            "inside": {"normalize": {"mean": MEAN.tolist(), "std": STD.tolist()}, "eval_crop": crop},
            "load": "mxnet.gluon.SymbolBlock.imports(symbol, ['data'], params)"}
    atomic_write_text(run_dir / MODEL_META, json.dumps(meta, indent=1) + "\n")
