"""The `id,label` CSV contract: trainLabels.csv, submission.csv and solution files, read and written here only.

One policy for every such file: UTF-8 (a byte-order mark and CRLF line ends accepted, as Windows
tools write them), the header `id,label`, ids positive integers (no sign, no leading zero) each
once, labels non-empty and usable as one path component, and with `classes` given, one of them.
Every problem is reported as `FILE:LINE: what`, the first MAX_SHOWN of them in one InputError.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from contracts.errors import InputError, offenders
from contracts.files import atomic_write, read_bounded

# The Kaggle CIFAR-10 class names, sorted (a prepared manifest's order): the default of demo data and score.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HEADER = ["id", "label"]
ID_PATTERN = r"[1-9][0-9]{0,17}"  # positive, and within int64
# Labels become folder names in d2l's layout, so they must be safe as one path component.
BAD_LABEL_PATTERN = r"[/\\\x00-\x1f]"
MAX_LABEL_CHARS = 200  # a folder name is at most 255 bytes
# Bytes of an id,label file read at most: the real trainLabels.csv (50,000 rows) is 600 KB, sampleSubmission.csv
# (300,000 rows) 4 MB; parsing takes several times the file's size in memory.
MAX_TABLE_BYTES = 64 << 20
SHOWN_CHARS = 40  # of a bad value quoted in a message (a line may be 300 KB long)


class LabelTable(NamedTuple):
    """An id,label file's rows in file order: int64 ids, str labels (object array), their line numbers."""

    ids: np.ndarray
    labels: np.ndarray
    lines: np.ndarray


def _short(value: str) -> str:
    """repr of value, cut to SHOWN_CHARS characters."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return repr(value[:SHOWN_CHARS]) + f"... ({len(value)} characters)"


def _text(path: Path, missing_hint: str, what: str) -> str:
    """The file as text without its byte-order mark; InputError naming the line of a non-UTF-8 byte,
    or the file if it is not a regular file of at most MAX_TABLE_BYTES."""
    try:
        data = read_bounded(path, MAX_TABLE_BYTES, what)
    except FileNotFoundError:
        raise InputError(f"{path}: cannot read: missing{missing_hint}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _check_header(path: Path, text: str) -> None:
    """Line 1 must be `id,label` (read with csv: pandas would take a longer header's first two names)."""
    first = text.split("\n", 1)[0].rstrip("\r")
    header = next(csv.reader([first]), [])
    if [cell.strip() for cell in header] != HEADER:
        raise InputError(f"{path}:1: header must be 'id,label', found {_short(first) if text else 'an empty file'}")


def _frame(path: Path, text: str, id_dtype: type) -> pd.DataFrame:
    """The data rows as columns id (id_dtype) and label (str), index = line number (the header is line 1)."""
    try:
        df = pd.read_csv(io.StringIO(text), header=None, names=HEADER, dtype={"id": id_dtype, "label": str},
                         na_filter=False, skip_blank_lines=False, index_col=False, engine="c", skiprows=1)
    except pd.errors.ParserError as exc:
        # "... Expected 2 fields in line N, saw M"
        where = str(exc).rsplit("line ", 1)[-1]
        raise InputError(f"{path}:{where.replace(', saw', ': expected 2 fields (id,label), found')}") from None
    except pd.errors.EmptyDataError:
        df = pd.DataFrame({"id": [], "label": []}, dtype=str)
    df.index = np.arange(2, len(df) + 2)
    spans = df["label"].str.contains("\n") if '"' in text else None  # only a quoted field can span lines
    if spans is not None and spans.any():  # it would shift the line number of every row after it
        line = int(df.index[spans][0])
        raise InputError(f"{path}:{line}: a label spans lines")
    return df


def _label_problem(label: str, classes: list[str] | None) -> str | None:
    """What is wrong with one stripped label under the policy ('' for an empty one), or None."""
    if not label:
        return ""
    if re.search(BAD_LABEL_PATTERN, label) or label in (".", "..") or len(label) > MAX_LABEL_CHARS:
        return f"label {_short(label)} cannot be used as a class folder name"
    if classes is not None and label not in classes:
        return f"label {_short(label)} is not one of the classes ({', '.join(classes)})"
    return None


def _fast(path: Path, text: str, classes: list[str] | None) -> LabelTable | None:
    """The table when every line is canonical (an id as write_table writes it, then a comma; ids once; good
    labels), checked without a Python step per row; None sends the file to _slow, which names the lines."""
    body = text.split("\n", 1)[1].rstrip("\r\n") if "\n" in text else ""
    if re.search(rf"(?m)^(?!{ID_PATTERN},)", body):
        return None
    try:
        df = _frame(path, text, np.int64)
    except (ValueError, OverflowError):
        return None
    if df["id"].duplicated().any() or any(u != u.strip() or _label_problem(u, classes) is not None
                                          for u in pd.unique(df["label"])):
        return None
    return LabelTable(df["id"].to_numpy(dtype=np.int64), df["label"].to_numpy(dtype=object),
                      df.index.to_numpy(np.int64))


def _slow(path: Path, text: str, classes: list[str] | None) -> LabelTable:
    """The table after stripping cells and skipping blank lines; InputError listing every FILE:LINE problem."""
    df = _frame(path, text, str)
    raw_id = df["id"].str.strip()
    codes, uniques = pd.factorize(df["label"])
    stripped = np.array([u.strip() for u in uniques] + [""], dtype=object)  # code -1 cannot occur: na_filter off
    label = pd.Series(stripped[codes], index=df.index)
    problem = np.array([_label_problem(u, classes) for u in stripped], dtype=object)[codes]
    blank = (raw_id == "") & (label == "")
    bad_id = ~raw_id.str.fullmatch(ID_PATTERN) & ~blank
    found = [(n, f"id {_short(v)} is not a positive integer") for n, v in raw_id[bad_id].items()]
    has_problem = pd.Series(problem != None, index=df.index) & ~bad_id & ~blank  # noqa: E711 - elementwise
    found += [(n, f"id {i} has an empty label" if problem[k] == "" else problem[k])
              for k, (n, i) in enumerate(raw_id.items()) if has_problem.iat[k]]
    ok = ~bad_id & ~blank & ~has_problem
    dup = ok & raw_id.duplicated(keep=False)
    first_line = raw_id[dup].reset_index().drop_duplicates("id").set_index("id")["index"]
    found += [(n, f"duplicate id {v} (first on line {first_line[v]})") for n, v in raw_id[dup].items()
              if first_line[v] != n]
    if found:
        raise InputError(offenders(f"{path}: bad rows", [f"{path}:{n}: {what}" for n, what in sorted(found)]))
    keep = ~blank
    return LabelTable(raw_id[keep].astype(np.int64).to_numpy(), label[keep].to_numpy(dtype=object),
                      df.index[keep].to_numpy(dtype=np.int64))


def read_table(path: str | Path, classes: list[str] | None = None, missing_hint: str = "",
               what: str = "id,label file") -> LabelTable:
    """Every row of an id,label file, checked against the policy; InputError listing FILE:LINE problems."""
    path = Path(path)
    text = _text(path, missing_hint, what)
    _check_header(path, text)
    return _fast(path, text, classes) or _slow(path, text, classes)


def read_labels(path: Path) -> dict[int, tuple[str, int]]:
    """trainLabels.csv as {id: (label, line number)}; InputError if it breaks the policy or has no rows."""
    table = read_table(path, missing_hint=" (the Kaggle download has trainLabels.csv beside train/)")
    if not len(table.ids):
        raise InputError(f"{path}: no labelled rows after the header")
    return dict(zip(table.ids.tolist(), zip(table.labels.tolist(), table.lines.tolist(), strict=True), strict=True))


def parse_classes(value: str | list[str], source: str) -> list[str]:
    """The class names of a comma-separated `classes` value (or a list), stripped, in the order given.

    InputError naming SOURCE (the flag or the config key) for an empty, unusable or repeated name, or fewer than 2.
    """
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value)]
    for name in names:
        if (problem := _label_problem(name, None)) is not None:
            raise InputError(f"{source}: {problem or 'a class name is empty'}")
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise InputError(f"{source}: {', '.join(map(repr, repeated))} {'is' if len(repeated) == 1 else 'are'} "
                           "listed more than once")
    if len(names) < 2:
        raise InputError(f"{source}: {len(names)} class ({', '.join(names)}); need at least 2")
    return names


def _classes_hint(classes: list[str]) -> str:
    return (f"the expected classes are {', '.join(classes)}; for a download with other classes, list them all "
            "with --classes (or the prepare section's classes key)")


def _not_a_class(label: str, folded: dict[str, str]) -> str:
    """Why LABEL is not a class: the class it differs from only in case (FOLDED: casefolded name -> class), if any."""
    near = folded.get(label.casefold())
    if near is not None:
        return f"{_short(label)} differs from class {near!r} only in case"
    return f"{_short(label)} is not one of the classes"


def check_classes(shown: Path, rows: dict[int, tuple[str, int]], classes: list[str]) -> None:
    """Every label of ROWS ({id: (label, line)}) is one of CLASSES and every class has a row; else InputError.

    A wrong label is named once, on its first line, with the number of other lines holding it.
    """
    expected = set(classes)
    lines: dict[str, list[int]] = {}
    for label, line in rows.values():
        if label not in expected:
            lines.setdefault(label, []).append(line)
    if lines:
        folded = {name.casefold(): name for name in reversed(classes)}  # the first class of a fold wins
        items = []
        for label, found in sorted(lines.items(), key=lambda item: min(item[1])):
            more = f" (and {len(found) - 1:,} more lines)" if len(found) > 1 else ""
            items.append(f"line {min(found)}: {_not_a_class(label, folded)}{more}")
        raise InputError(offenders(f"{shown}: labels that are not among the classes", items) + "\n"
                           + _classes_hint(classes))
    missing = expected - {label for label, _ in rows.values()}
    if missing:
        names = [name for name in classes if name in missing]
        raise InputError(f"classes with no training image in {shown} ({len(names)}): "
                           f"{', '.join(map(repr, names))}\n{_classes_hint(classes)}")


def write_table(path: str | Path, ids: np.ndarray, labels: np.ndarray | list[str]) -> Path:
    """Write `id,label` rows (ids positive, each once) to a temporary sibling, then rename it to path."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 1 or len(np.unique(ids)) != len(ids)):
        raise ValueError(f"{path}: ids must be positive integers, each once")
    frame = pd.DataFrame({"id": ids, "label": np.asarray(labels, dtype=object)})

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            frame.to_csv(f, index=False, lineterminator="\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    return Path(path)
