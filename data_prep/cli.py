"""`cifar10-hvd prepare` / `python -m data_prep`: the command line of data preparation."""
from __future__ import annotations

import argparse
import signal
import sys

from contracts.errors import InputError, offenders, run_command
from contracts.schema import Parser, add_flags, resolve
from data_prep.config import PrepareConfig
from data_prep.preparation import prepare
from data_prep.publish import Stopped
from data_prep.store import MANIFEST, verify


def build_parser() -> argparse.ArgumentParser:
    """The flags of `prepare`: paths and --force here, the options from PrepareConfig."""
    p = Parser(
        prog="cifar10-hvd prepare",
        description="Validate the Kaggle CIFAR-10 download (folders, train.7z/test.7z, or the competition zip), "
                    "decode it once and publish packed arrays that every rank reads its shard of.")
    p.add_argument("--data", metavar="SRC",
                   help="the download: a folder with train/ (or train.7z), test/ (or test.7z) and "
                        "trainLabels.csv, or the competition's zip")
    p.add_argument("--out", metavar="PREP", help="the prepared directory to publish")
    p.add_argument("--verify", metavar="PREP", help="instead of preparing: re-hash PREP's files against its "
                   "manifest (run it after copying PREP to new storage)")
    p.add_argument("--config", default=None, help="YAML file whose prepare: section sets the options below")
    p.add_argument("--force", action="store_true", help="replace PREP even if it was prepared differently")
    add_flags(p, PrepareConfig)
    return p


def verify_command(prep_dir: str) -> int:
    """`prepare --verify PREP`: 0 when every file hashes as the manifest says, else InputError (exit 2)."""
    differ = verify(prep_dir)
    if differ:
        raise InputError(offenders(f"{prep_dir}: files whose sha256 differs from {MANIFEST}", differ))
    print(f"verified {prep_dir}: every file matches {MANIFEST}")
    return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        return verify_command(args.verify)
    if not (args.data and args.out):
        parser.error("--data and --out are required (or --verify PREP)")
    cfg = resolve(PrepareConfig, args, args.config, "prepare")
    try:
        prepare(args.data, args.out, cfg, force=args.force)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Stopped)
        stopped = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"{'interrupted' if stopped == signal.SIGINT else signal.Signals(stopped).name}; "
              "the prepared directory was left as it was", file=sys.stderr)
        return 128 + stopped
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run prepare; 0 on success or up to date, 2 on bad input (message on stderr), 1 on other failures."""
    return run_command("prepare", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
