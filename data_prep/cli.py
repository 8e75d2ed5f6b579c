"""`cifar10-hvd prepare` / `python -m data_prep`: the command line of data preparation."""
from __future__ import annotations

import argparse
import sys

from data_prep.errors import PrepareError
from data_prep.pipeline import prepare


def build_parser() -> argparse.ArgumentParser:
    """The flags of `prepare`."""
    p = argparse.ArgumentParser(
        prog="cifar10-hvd prepare",
        description="Validate the Kaggle CIFAR-10 download (folders, train.7z/test.7z, or the competition zip), "
                    "decode it once and publish packed arrays that every rank reads its shard of.")
    p.add_argument("--data", required=True, metavar="SRC",
                   help="the download: a folder with train/ (or train.7z), test/ (or test.7z) and "
                        "trainLabels.csv, or the competition's zip")
    p.add_argument("--out", required=True, metavar="PREP", help="the prepared directory to publish")
    p.add_argument("--valid-ratio", type=float, default=0.1,
                   help="held-out share: max(1, floor(smallest class * ratio)) images per class (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffle choosing valid images")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("--layout", choices=["folders"], default=None,
                   help="also write the seed's train_valid_test/ class folders (hard links) inside PREP")
    p.add_argument("--force", action="store_true", help="replace PREP even if it was prepared differently")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run prepare; 0 on success or up to date, 2 on bad input (message on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        prepare(args.data, args.out, valid_ratio=args.valid_ratio, seed=args.seed, workers=args.workers,
                layout=args.layout, force=args.force)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted; the prepared directory was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
