"""RUN/metrics.jsonl (one JSON object per epoch) and RUN/curves.png drawn from it.

Only rank 0 calls these. Lines are appended and flushed to disk per epoch; on resume the
log is cut back to the epochs before the resume point, so a rerun epoch appears once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.files import atomic_write, atomic_write_text

METRICS = "metrics.jsonl"
CURVES = "curves.png"


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


def draw_curves(ax, records: list[dict]) -> None:
    """Train loss, train accuracy and valid accuracy against epoch on ax, like the seed's plot."""
    epochs = [r["epoch"] + 1 for r in records]  # metrics count from 0; plot epochs completed
    ax.plot(epochs, [r["train_loss"] for r in records], label="train loss")
    ax.plot(epochs, [r["train_acc"] for r in records], linestyle="--", label="train acc")
    valid = [(e, r["valid_acc"]) for e, r in zip(epochs, records, strict=True) if r.get("valid_acc") is not None]
    if valid:
        ax.plot(*zip(*valid, strict=True), linestyle="-.", label="valid acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(left=min(epochs, default=1) - 0.5 if epochs else 0)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_curves(run_dir: str | Path, records: list[dict]) -> None:
    """RUN/curves.png from the records (draw_curves), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    draw_curves(ax, records)
    fig.tight_layout()
    atomic_write(Path(run_dir) / CURVES, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
