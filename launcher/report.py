"""report.png: the tune and final phases' curves and the run's headline figures on one page."""
from __future__ import annotations

from pathlib import Path

from contracts.files import atomic_write
from trainer.curves import draw_curves
from trainer.rundir import read_metrics


def write_report(workdir: Path, summary: dict) -> Path | None:
    """Plot loss/accuracy per epoch for each training phase that ran; None when none did."""
    phases = {name: read_metrics(workdir / name) for name in ("tune", "final")}
    phases = {k: v for k, v in phases.items() if v}
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], phases.items(), strict=True):
        draw_curves(ax, rows)
        stage = summary.get("stages", {}).get(name, {})
        title = f"{name}: {stage.get('images_per_sec', '?')} img/s"
        if stage.get("valid_acc") is not None:
            title += f", valid acc {stage['valid_acc']:.3f}"
        ax.set_title(title)
    fig.tight_layout()
    out = workdir / "report.png"
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return out
