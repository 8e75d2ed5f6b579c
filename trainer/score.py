"""Score a submission.csv against a solution file (`id,label` for the ids that count).

Prints overall and per-class accuracy and writes a confusion-matrix PNG beside the
submission. Malformed rows, duplicate ids, labels outside the classes and solution
ids missing from the submission are input errors naming the file and line (exit 2).

    cifar10-hvd score --submission FILE --solution FILE [--prepared PREP | --classes a,b,...] [--plot PNG]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from data_prep.errors import InputError, run_command
from data_prep.schema import Parser

# The Kaggle CIFAR-10 class names, sorted (the manifest's order); used when no --prepared/--classes is given.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


ScoreError = InputError  # a submission or solution file is malformed; the message names the file and line


def read_labels(path: str | Path, classes: list[str], wanted: dict[int, int] | None = None) -> tuple[dict[int, int], dict[int, int]]:
    """({id: class index}, {id: line number}) from an `id,label` CSV, checking header, ids, duplicates and labels.

    With wanted (a solution's {id: index}), only those ids are kept, so a 300,000-row
    submission costs a set of ids, not a dict of all rows.
    """
    path = Path(path)
    index = {c: i for i, c in enumerate(classes)}
    seen: set[int] = set()
    rows: dict[int, int] = {}
    lines: dict[int, int] = {}
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ScoreError(f"{path}: cannot read: {e.strerror}") from e
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["id", "label"]:
            raise ScoreError(f"{path}:1: header must be 'id,label', got {','.join(header or [])!r}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 2:
                raise ScoreError(f"{path}:{line}: expected 2 fields (id,label), got {len(row)}")
            raw_id, label = row[0].strip(), row[1].strip()
            try:
                id_ = int(raw_id)
            except ValueError:
                raise ScoreError(f"{path}:{line}: id {raw_id!r} is not an integer") from None
            if id_ in seen:
                raise ScoreError(f"{path}:{line}: duplicate id {id_}")
            seen.add(id_)
            if label not in index:
                raise ScoreError(f"{path}:{line}: label {label!r} is not one of the classes ({', '.join(classes)})")
            if wanted is None or id_ in wanted:
                rows[id_] = index[label]
                lines[id_] = line
    return rows, lines


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts: row = true class, column = predicted class."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
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
    from trainer.checkpoint import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def score(submission: str | Path, solution: str | Path, classes: list[str] | None = None,
          plot: str | Path | None = None) -> dict:
    """Accuracy of submission on the solution's ids: {"accuracy", "count", "per_class", "confusion", "plot"}."""
    classes = list(classes or CIFAR10_CLASSES)
    submission = Path(submission)
    truth, truth_lines = read_labels(solution, classes)
    if not truth:
        raise ScoreError(f"{solution}: no rows to score")
    preds, _ = read_labels(submission, classes, wanted=truth)
    missing = [i for i in truth if i not in preds]
    if missing:
        raise ScoreError(f"{solution}:{truth_lines[missing[0]]}: id {missing[0]} is not in {submission} "
                         f"({len(missing)} solution id(s) missing)")
    ids = sorted(truth)
    t = np.array([truth[i] for i in ids], dtype=np.int64)
    p = np.array([preds[i] for i in ids], dtype=np.int64)
    matrix = confusion(t, p, len(classes))
    per_class = {c: (float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None) for k, c in enumerate(classes)}
    accuracy = float(np.trace(matrix) / len(ids))
    plot_path = Path(plot) if plot else submission.with_name(submission.stem + "-confusion.png")
    plot_confusion(matrix, classes, plot_path, f"{submission.name}: accuracy {accuracy:.4f} on {len(ids)} ids")
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
            raise ScoreError(f"{args.prepared}: cannot read the manifest's classes: {e}") from e
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
