"""The run directory's files: config.json, atomic per-epoch checkpoints, and finding the model to load.

A checkpoint for epoch E is checkpoints/epoch-EEEE.{params,states,json}; the .json is
written last, so a checkpoint without it is incomplete (the job died while writing it)
and is ignored. Every file is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.errors import InputError
from data_prep.files import atomic_write, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
FINAL_PARAMS = "model-final.params"
RUN_CONFIG = "config.json"
_NAME = re.compile(r"^epoch-(\d{4,})\.json$")


RunDirError = InputError  # a run directory lacks what was asked of it; the message names the path (exit 2)


def read_run_config(run_dir: str | Path) -> dict:
    """RUN/config.json as a dict (train config, classes, phase, world size, lr used, versions)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RunDirError(f"{path}: no run config (is {run_dir} a trainer run directory?)") from e
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON: {e}") from e


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
