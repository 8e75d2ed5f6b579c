"""The one error type of data preparation: bad input the user must fix (exit status 2)."""
from __future__ import annotations

from collections.abc import Sequence

MAX_SHOWN = 10  # offenders listed in a message; the rest are counted


class PrepareError(Exception):
    """Bad input or an unusable output location; the CLI prints it and exits with status 2."""

    exit_status = 2


def offenders(what: str, items: Sequence[str]) -> str:
    """'WHAT (N):' followed by the first MAX_SHOWN items, one a line, and how many were left out."""
    lines = [f"{what} ({len(items)}):"]
    lines += [f"  {item}" for item in items[:MAX_SHOWN]]
    if len(items) > MAX_SHOWN:
        lines.append(f"  ... and {len(items) - MAX_SHOWN} more")
    return "\n".join(lines)
