"""The one error convention of every cifar10-hvd command.

Bad input the user must fix is an InputError: the command prints
`cifar10-hvd <stage>: <message>` (the message names the file, line or key) and exits 2.
Anything else is a failure: a traceback, then `[rank N] cifar10-hvd <stage>: error: ...`, exit 1.
Every stage raises this one class; nothing else is an input error.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

MAX_SHOWN = 10  # offenders listed in a message; the rest are counted
# Set by `cifar10-hvd run` for a stage it starts under horovodrun, which reports any failed rank as exit 1:
# a rank that ends on bad input appends its message to this file, and run exits 2 as the stage's command would.
INPUT_ERROR_FILE = "CIFAR10_HVD_INPUT_ERROR_FILE"


class InputError(ValueError):
    """Bad input or an unusable output location; the CLI prints it and exits with status 2."""

    exit_status = 2




def offenders(what: str, items: Sequence[str]) -> str:
    """'WHAT (N):' followed by the first MAX_SHOWN items, one a line, and how many were left out."""
    lines = [f"{what} ({len(items)}):"]
    lines += [f"  {item}" for item in items[:MAX_SHOWN]]
    if len(items) > MAX_SHOWN:
        lines.append(f"  ... and {len(items) - MAX_SHOWN} more")
    return "\n".join(lines)


def rank_name() -> str:
    """'[rank N] ' inside an MPI world (horovodrun, mpirun, PMI), else '[rank 0] '."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return f"[rank {os.environ[var]}] "
    return "[rank 0] "


def _note_input_error(message: str) -> None:
    """Append MESSAGE to INPUT_ERROR_FILE where the launcher set one (best effort: the exit status stays)."""
    path = os.environ.get(INPUT_ERROR_FILE)
    if path:
        try:
            with open(path, "a") as f:
                f.write(message + "\n")
        except OSError:
            pass


def run_command(stage: str, body: Callable[[], int | None]) -> int:
    """Run a command's body under the convention: 0 (or body's status), 2 for InputError, 1 for anything else."""
    try:
        return int(body() or 0)
    except SystemExit as exc:  # --help, --version: argparse's own exits (usage errors raise InputError)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except InputError as exc:
        print(f"cifar10-hvd {stage}: {exc}", file=sys.stderr)
        _note_input_error(f"cifar10-hvd {stage}: {exc}")
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{rank_name()}cifar10-hvd {stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure ends this rank non-zero, with its rank named
        traceback.print_exc()
        print(f"{rank_name()}cifar10-hvd {stage}: error: {exc}", file=sys.stderr)
        return 1
