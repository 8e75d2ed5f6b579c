"""RUN/curves.png: train loss, train accuracy and valid accuracy against epoch, drawn from metrics.jsonl's records.

Pure plotting; the file names and metrics.jsonl's reader and writer belong to trainer.rundir. Only rank 0 draws.
"""
from __future__ import annotations

from pathlib import Path

from contracts.files import atomic_write
from trainer.rundir import CURVES


def draw_curves(ax, records: list[dict]) -> None:
    """Train loss, train accuracy and valid accuracy against epoch on ax, like d2l's plot."""
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
