"""Score a submission.csv against a solution file (`id,label` for the ids that count).

Prints overall and per-class accuracy and writes a confusion-matrix PNG beside the
submission. Malformed rows, duplicate ids, labels outside the classes and solution
ids missing from the submission are input errors naming the file and line (exit 2).

    cifar10-hvd score --submission FILE --solution FILE [--prepared PREP | --classes a,b,...] [--plot PNG]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from contracts.errors import InputError, run_command
from contracts.files import atomic_write, check_output
from contracts.labels import CIFAR10_CLASSES, read_table
from contracts.schema import Parser


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts: row = true class, column = predicted class."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str, what: str = "plot") -> Path:
    """Row-normalized confusion matrix PNG, written to a temporary sibling and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), what)
    finally:
        plt.close(fig)
    return path


def score(submission: str | Path, solution: str | Path, classes: list[str] | None = None,
          plot: str | Path | None = None) -> dict:
    """Accuracy of submission on the solution's ids: {"accuracy", "count", "per_class", "confusion", "plot"}."""
    classes = list(classes or CIFAR10_CLASSES)
    submission = Path(submission)
    plot_path = Path(plot) if plot else submission.with_name(submission.stem + "-confusion.png")
    plot_what = "--plot" if plot else "confusion-matrix plot"
    check_output(plot_path, plot_what)  # before any work
    truth = read_table(solution, classes, what="solution")
    if not len(truth.ids):
        raise InputError(f"{solution}: no rows to score")
    sub = read_table(submission, classes, what="submission")
    index = {c: i for i, c in enumerate(classes)}
    preds = dict(zip(sub.ids.tolist(), sub.labels.tolist(), strict=True))
    missing = [(i, n) for i, n in zip(truth.ids.tolist(), truth.lines.tolist(), strict=True) if i not in preds]
    if missing:
        raise InputError(f"{solution}:{missing[0][1]}: id {missing[0][0]} is not in {submission} "
                         f"({len(missing)} solution id(s) missing)")
    order = np.argsort(truth.ids)
    ids = truth.ids[order].tolist()
    t = np.array([index[c] for c in truth.labels[order]], dtype=np.int64)
    p = np.array([index[preds[i]] for i in ids], dtype=np.int64)
    matrix = confusion(t, p, len(classes))
    per_class = {c: (float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None) for k, c in enumerate(classes)}
    accuracy = float(np.trace(matrix) / len(ids))
    plot_confusion(matrix, classes, plot_path, f"{submission.name}: accuracy {accuracy:.4f} on {len(ids)} ids", plot_what)
    return {"accuracy": accuracy, "count": len(ids), "per_class": per_class,
            "confusion": matrix.tolist(), "plot": str(plot_path)}


def build_parser() -> argparse.ArgumentParser:
    """The score command line."""
    p = Parser(prog="cifar10-hvd score", description=__doc__.split("\n")[0])
    p.add_argument("--submission", required=True, help="submission CSV (id,label)")
    p.add_argument("--solution", required=True, help="solution CSV (id,label) for the ids that count")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prepared", default=None, help="take the class names from this prepared dir's manifest")
    g.add_argument("--classes", default=None, help="comma-separated class names (default: the CIFAR-10 ten)")
    p.add_argument("--plot", default=None, help="confusion-matrix PNG (default: SUBMISSION-confusion.png beside it)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    classes = None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.prepared:
        import data_prep

        try:
            classes = list(data_prep.read_manifest(args.prepared)["classes"])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{args.prepared}: cannot read the manifest's classes: {e}") from e
    result = score(args.submission, args.solution, classes, args.plot)
    print(f"accuracy: {result['accuracy']:.4f} ({result['count']} ids)")
    for c, acc in result["per_class"].items():
        print(f"  {c:<12} {'-' if acc is None else f'{acc:.4f}'}")
    print(f"confusion matrix: {result['plot']}")
    if args.json:
        print(json.dumps({k: result[k] for k in ("accuracy", "count", "per_class", "plot")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 for input errors (file:line named), 1 for other failures."""
    return run_command("score", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
