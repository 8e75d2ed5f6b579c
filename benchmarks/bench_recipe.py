"""Time to accuracy, side by side: valid accuracy against wall-clock seconds, one curve per recipe.

Each recipe is a run config plus overrides, trained with `cifar10-hvd run --phases tune` on the same
prepared data, one after another. Wall-clock time starts when the command starts (horovodrun, imports
and data loading included) and each point is when that epoch's metrics row appeared in
WORKDIR/tune/metrics.jsonl. Writes OUT/recipe.png and OUT/recipe.md; with --ablate, the candidate
minus each ingredient one at a time (OUT/ablation.png, OUT/ablation.md).

    .venv/bin/python benchmarks/bench_recipe.py --prepared PREP --out OUT [--budget SEC] [--epochs E]
    .venv/bin/python benchmarks/bench_recipe.py --train 50000 --out OUT        # prepares real data first
    .venv/bin/python benchmarks/bench_recipe.py --prepared PREP --out OUT --only-ablate --ablate-epochs 8 \
        --ablate-set train.low_res_epochs=4

Default recipes: seed-w16 (configs/seed.yaml at width 16, batched pipeline: d2l's augmentation
drawn identically), cpu-small-before (a 20-epoch baseline,
benchmarks/recipes/cpu-small-2026-11-25.yaml) and cpu-small (configs/cpu-small.yaml, the recipe; the
ablation takes the last recipe). --recipe NAME=CONFIG[,key=value...] replaces them. Timings are only
comparable on an idle machine: the report records the load average before and after each run, and
--merge plots curves measured by separate invocations (each idle) together.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_DATA = Path("/work/shared/data/make_kaggle_cifar10.py")
DEFAULT_RECIPES = ("seed-w16=configs/seed.yaml,train.width=16,train.pipeline=batched",
                   "cpu-small-before=benchmarks/recipes/cpu-small-2026-11-25.yaml",
                   "cpu-small=configs/cpu-small.yaml")
# the candidate's ingredients and the value that turns each one off (d2l's)
# (flip TTA in validation, train.tta, needs no run of its own: each row's "plain" column is the same model
# without it)
INGREDIENTS = {"padcrop": ["train.augment=d2l", "train.flip=random"], "cutout": ["train.cutout=0"], "ema": ["train.ema=0"],
               "zero_init_residual": ["train.zero_init_residual=false"], "no_wd_bn_bias": ["train.wd_bn_bias=true"],
               "nesterov": ["train.nesterov=false"], "label_smoothing": ["train.label_smoothing=0"],
               "low_res": ["train.low_res=0", "train.low_res_epochs=0"], "stage_mult": ["train.stage_mult=1,2,4,8"],
               "stem_stride": ["train.stem_stride=1"], "stem_pool": ["train.stem_pool=0"],
               "stem_init": ["train.stem_init=xavier"], "flip": ["train.flip=random"], "bn_momentum": ["train.bn_momentum=0.9"]}


@dataclass
class Recipe:
    """A named run config and its key=value overrides."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        """NAME=CONFIG[,key=value...]; a piece without '=' continues the previous value (train.stage_mult=1,2,4,16)."""
        name, _, rest = spec.partition("=")
        config, *pieces = rest.split(",")
        overrides: list[str] = []
        for piece in pieces:
            if "=" not in piece and overrides:
                overrides[-1] += "," + piece
            else:
                overrides.append(piece)
        if not name or not config:
            raise SystemExit(f"--recipe {spec!r}: expected NAME=CONFIG[,key=value...]")
        return cls(name, config, overrides)


@dataclass
class Result:
    """One recipe's curve: (seconds since start, epoch, valid accuracy, plain-view accuracy or None) per
    epoch, and how it ended. valid accuracy is in the recipe's validation view (train.tta); the plain
    view's is recorded beside it when that differs."""

    name: str
    command: str
    points: list[tuple]
    wall_seconds: float
    status: str  # done, stopped (budget), failed
    load_before: float
    load_after: float

    def final(self) -> float | None:
        return self.points[-1][2] if self.points else None

    def best(self) -> float | None:
        return max(p[2] for p in self.points) if self.points else None

    def final_plain(self) -> float | None:
        """The last epoch's accuracy without test-time augmentation."""
        if not self.points:
            return None
        return self.points[-1][3] if len(self.points[-1]) > 3 and self.points[-1][3] is not None else self.final()

    def time_to(self, acc: float) -> float | None:
        """Seconds until valid accuracy first reached acc (None if it never did)."""
        return next((p[0] for p in self.points if p[2] >= acc), None)


def new_rows(path: Path, seen: int) -> list[dict]:
    """metrics.jsonl rows after the first `seen` complete ones."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines()[seen:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line: read it next time
    return rows


def train_recipe(recipe: Recipe, prepared: Path, workdir: Path, extra: list[str], budget: float | None) -> Result:
    """Run the recipe's tune phase, timestamping each epoch's metrics row; stop it after budget seconds."""
    cmd = [str(BIN / "cifar10-hvd"), "run", "--config", str(ROOT / recipe.config), "--prepared", str(prepared),
           "--workdir", str(workdir), "--phases", "tune", *recipe.overrides, *extra]
    metrics_path, points, status = workdir / "tune" / "metrics.jsonl", [], "done"
    load_before = os.getloadavg()[0]
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = open(workdir.parent / f"{workdir.name}.log", "w")
    start = time.perf_counter()
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        while True:
            done = job.poll() is not None
            for row in new_rows(metrics_path, len(points)):
                points.append((round(time.perf_counter() - start, 1), row["epoch"] + 1, row["valid_acc"],
                               row.get("valid_acc_plain")))
            if done:
                break
            if budget and time.perf_counter() - start > budget:
                os.killpg(job.pid, signal.SIGTERM)
                job.wait(timeout=60)
                status = "stopped"
                break
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    if status == "done" and job.returncode != 0:
        status = f"failed ({job.returncode}, see {log.name})"
    return Result(recipe.name, " ".join(cmd[1:]), points, round(time.perf_counter() - start, 1), status,
                  load_before, os.getloadavg()[0])


def prepare_real(train: int, test: int, scratch: Path) -> Path:
    """Real CIFAR-10 images in the Kaggle layout (make_kaggle_cifar10.py), prepared."""
    if not MAKE_DATA.exists():
        raise SystemExit(f"{MAKE_DATA}: not found; pass --prepared PREP")
    src, prepared = scratch / "kaggle", scratch / "prepared"
    subprocess.run([sys.executable, str(MAKE_DATA), "--out", str(src), "--train", str(train), "--test", str(test)],
                   check=True)
    subprocess.run([str(BIN / "cifar10-hvd"), "prepare", "--data", str(src), "--out", str(prepared)], check=True)
    return prepared


def plot(results: list[Result], path: Path, title: str) -> None:
    """Valid accuracy against wall-clock seconds, one curve per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r.points:
            line, = ax.plot([p[0] for p in r.points], [p[2] for p in r.points], marker=".",
                            label=f"{r.name} ({r.status})")
            plain = [(p[0], p[3]) for p in r.points if len(p) > 3 and p[3] is not None]
            if plain:
                ax.plot(*zip(*plain, strict=True), linestyle="--", color=line.get_color(), alpha=0.6, label=f"{r.name}, no TTA")
    ax.set_xlabel("wall-clock seconds since the command started")
    ax.set_ylabel("valid accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def table(results: list[Result], base: Result | None = None) -> str:
    """Markdown: per recipe its epochs, wall time, final and best valid accuracy, time to 85% and 90%."""
    head = ("| recipe | epochs | wall s | final valid | final, no TTA | best valid | s to 85% | s to 90% "
            "| load 1-min before/after | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        delta = ""
        if base is not None and r is not base and r.final() is not None and base.final() is not None:
            delta = f" ({100 * (r.final() - base.final()):+.2f})"
        epochs = r.points[-1][1] if r.points else 0
        lines.append(f"| {r.name} | {epochs} | {r.wall_seconds:.0f} | {pct(r.final())}{delta} | {pct(r.final_plain())} | "
                     f"{pct(r.best())} | "
                     f"{secs(r.time_to(0.85))} | {secs(r.time_to(0.90))} | {r.load_before:.1f}/{r.load_after:.1f} | "
                     f"{r.status} |")
    return "\n".join(lines) + "\n"


def merged(out: Path, stem: str, results: list[Result]) -> list[Result]:
    """OUT/STEM.json's earlier curves (from other invocations, each measured on its own) with these
    results, a rerun recipe replacing its earlier curve."""
    path = out / f"{stem}.json"
    earlier = [Result(**r) for r in json.loads(path.read_text())] if path.exists() else []
    names = {r.name for r in results}
    return [r for r in earlier if r.name not in names] + results


def report(results: list[Result], out: Path, stem: str, title: str, base: Result | None = None) -> None:
    """OUT/STEM.png, OUT/STEM.md and OUT/STEM.json (the curves' points)."""
    plot(results, out / f"{stem}.png", title)
    commands = "".join(f"- {r.name}: `cifar10-hvd {r.command}`\n" for r in results)
    load = "".join(f"{x:.1f} " for x in os.getloadavg())
    (out / f"{stem}.md").write_text(f"# {title}\n\n![{stem}]({stem}.png)\n\n{table(results, base)}\n{commands}\n"
                                    f"{os.cpu_count()} CPUs; load average at the end (1, 5, 15 min): {load}\n")
    (out / f"{stem}.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    print(table(results, base), flush=True)


def ablation(candidate: Recipe, prepared: Path, out: Path, extra: list[str], budget: float | None,
             only: list[str] | None = None, merge: bool = False) -> None:
    """The candidate, then the candidate minus each ingredient (its seed value), with the same overrides."""
    base = candidate.overrides + extra  # the ingredient's off values last: they win over extra
    runs = {"all": Recipe(candidate.name, candidate.config, base)}
    runs.update({f"minus-{name}": Recipe(f"- {name}", candidate.config, base + off) for name, off in INGREDIENTS.items()})
    runs = {slug: r for slug, r in runs.items() if not only or slug in only}
    results = [train_recipe(r, prepared, out / "runs" / "ablation" / slug, [], budget) for slug, r in runs.items()]
    if merge:
        results = merged(out, "ablation", results)
    base = next((r for r in results if r.name == candidate.name), None)
    report(results, out, "ablation", f"{candidate.name} minus one ingredient"
           + (f" ({', '.join(extra)})" if extra else ""), base=base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", help="a prepared dir (default: prepare real data with --train/--test)")
    p.add_argument("--train", type=int, default=50000, help="real training images to prepare (no --prepared)")
    p.add_argument("--test", type=int, default=100, help="test images to prepare (tune ignores them)")
    p.add_argument("--out", required=True, help="directory for the plots, tables and run dirs")
    p.add_argument("--recipe", action="append", help="NAME=CONFIG[,key=value...] (repeatable)")
    p.add_argument("--epochs", type=int, help="override every recipe's train.epochs")
    p.add_argument("--budget", type=float, help="stop each run after this many wall-clock seconds")
    p.add_argument("--ablate", action="store_true", help="then the last recipe minus each ingredient")
    p.add_argument("--only-ablate", action="store_true", help="the ablation alone")
    p.add_argument("--ablate-epochs", type=int, help="train.epochs for the ablation runs (shorter runs)")
    p.add_argument("--ablate-set", action="append", default=[], metavar="KEY=VALUE",
                   help="another override for the ablation runs, e.g. train.low_res_epochs=4 (repeatable)")
    p.add_argument("--ablate-only", nargs="+", metavar="RUN",
                   help="only these ablation runs: all, minus-INGREDIENT (" + ", ".join(INGREDIENTS) + ")")
    p.add_argument("--merge", action="store_true",
                   help="keep the curves/rows already in OUT's recipe.json/ablation.json from earlier invocations")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = [Recipe.parse(s) for s in (args.recipe or DEFAULT_RECIPES)]
    for r in recipes:
        if not (ROOT / r.config).is_file():
            raise SystemExit(f"{r.config}: no such config")
    with tempfile.TemporaryDirectory(prefix="bench_recipe.", dir=out) as scratch:
        prepared = Path(args.prepared) if args.prepared else prepare_real(args.train, args.test, Path(scratch))
        extra = [f"train.epochs={args.epochs}"] if args.epochs else []
        if not args.only_ablate:
            results = [train_recipe(r, prepared, out / "runs" / r.name, extra, args.budget) for r in recipes]
            if args.merge:
                results = merged(out, "recipe", results)
            report(results, out, "recipe", "valid accuracy against wall-clock time, tune phase")
        if args.ablate or args.only_ablate:
            epochs = args.ablate_epochs or args.epochs
            ablate_extra = ([f"train.epochs={epochs}"] if epochs else []) + args.ablate_set
            ablation(recipes[-1], prepared, out, ablate_extra, args.budget, args.ablate_only, args.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
