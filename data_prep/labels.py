"""Read and check the competition's trainLabels.csv (id,label), the only source of truth for labels."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from data_prep.errors import PrepareError, offenders

POSITIVE_INT = re.compile(r"[1-9][0-9]*")
# Labels become folder names in the seed's layout, so they must be safe as one path component.
BAD_LABEL_CHARS = re.compile(r"[/\\\x00-\x1f]")


def read_labels(path: Path) -> dict[int, tuple[str, int]]:
    """Map each id to (label, line number); raise PrepareError listing every bad line.

    Accepts CRLF line endings and a UTF-8 byte-order mark, as Windows tools write them.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise PrepareError(f"{path}: missing (the Kaggle download has trainLabels.csv beside train/)") from None
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise PrepareError(f"{path}: line 1: {exc}") from None
    if header is None or [cell.strip() for cell in header] != ["id", "label"]:
        shown = ",".join(header) if header else "an empty file"
        raise PrepareError(f"{path}: line 1: header must be 'id,label', found {shown!r}")

    labels: dict[int, tuple[str, int]] = {}
    problems: list[str] = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line, e.g. a trailing newline
            if len(row) != 2:
                problems.append(f"line {line}: expected 2 fields (id,label), found {len(row)}: {','.join(row)!r}")
                continue
            raw_id, label = row[0].strip(), row[1].strip()
            if not POSITIVE_INT.fullmatch(raw_id):
                problems.append(f"line {line}: id {raw_id!r} is not a positive integer")
                continue
            if not label:
                problems.append(f"line {line}: id {raw_id} has an empty label")
                continue
            if BAD_LABEL_CHARS.search(label) or label in (".", ".."):
                problems.append(f"line {line}: label {label!r} cannot be used as a class folder name")
                continue
            image_id = int(raw_id)
            if image_id in labels:
                problems.append(f"line {line}: duplicate id {image_id} (first on line {labels[image_id][1]})")
                continue
            labels[image_id] = (label, line)
    except csv.Error as exc:
        problems.append(f"line {reader.line_num}: {exc}")
    if problems:
        raise PrepareError(offenders(f"{path}: bad rows", problems))
    if not labels:
        raise PrepareError(f"{path}: no labelled rows after the header")
    return labels
