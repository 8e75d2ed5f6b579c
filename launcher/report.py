"""report.png: the tune and final phases' curves and the run's headline figures on one page."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(workdir: Path, summary: dict) -> Path | None:
    """Plot loss/accuracy per epoch for each training phase that ran; None when none did."""
    phases = {name: _metrics(workdir / name / "metrics.jsonl") for name in ("tune", "final")}
    phases = {k: v for k, v in phases.items() if v}
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], phases.items(), strict=True):
        epochs = [r["epoch"] + 1 for r in rows]  # metrics count from 0; plot epochs completed
        ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
        ax.plot(epochs, [r["train_acc"] for r in rows], label="train acc")
        if any(r.get("valid_acc") is not None for r in rows):
            ax.plot(epochs, [r.get("valid_acc") for r in rows], label="valid acc")
        stage = summary.get("stages", {}).get(name, {})
        title = f"{name}: {stage.get('images_per_sec', '?')} img/s"
        if stage.get("valid_acc") is not None:
            title += f", valid acc {stage['valid_acc']:.3f}"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = workdir / "report.png"
    tmp = workdir / ".report.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out
