"""`cifar10-hvd`: one entry point whose subcommands are the stages' own command lines."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("launcher.run", "run the whole job (prepare, tune, final, predict) from a YAML config"),
    "prepare": ("data_prep.cli", "validate a Kaggle download and publish it packed (also: python -m data_prep)"),
    "train": ("trainer.train", "train ResNet-18 under horovodrun or alone (also: python -m trainer)"),
    "predict": ("predictor.predict", "sharded inference, rank 0 writes submission.csv (also: python -m predictor.predict)"),
    "export": ("trainer.onnx_export", "write a run's exported model as ONNX (uint8 images in, logits out)"),
    "score": ("predictor.score", "score a submission against a solution file"),
    "demo-data": ("launcher.demo_data", "write a procedural dataset laid out like the Kaggle download"),
    "doctor": ("launcher.doctor", "report Python, MXNet, Horovod, MPI and GPUs, and what is missing"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: cifar10-hvd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "cifar10-hvd COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's main(argv) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cifar10-hvd: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
