"""`cifar10-hvd run`: the whole job (prepare, tune, final, predict) from one YAML config.

Outside an MPI world it starts each stage itself: `prepare` as one process, the
training and predict stages through `horovodrun` (the exact command is printed so it
can be copied). Inside one (started by horovodrun, mpirun or an MPIJob launcher) it
runs the stages in-process on every rank instead of launching again. Each finished
stage leaves a marker with a hash of the config it ran with (and of the prepared data it
read); a re-run skips stages whose marker matches and whose outputs are complete. Prepare
always runs: it answers "up to date" itself, from the source's fingerprint.

The stages are declared in launcher/stages.py; launching them as children is launcher/launch.py's part,
running them inside an MPI world launcher/in_world.py's, relaunching one that lost a host or rank
(--max-restarts) launcher/restart.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from contracts.errors import InputError, run_command
from contracts.files import atomic_write_text
from contracts.lock import lock_dir
from contracts.schema import Parser, add_flags, apply_flags
from data_prep import read_manifest
from launcher import child, in_world, workdir
from launcher.launch import MPI_KEEPALIVE, Children, HostUnreachable, check_hosts, child_env, horovodrun_argv
from launcher.report import write_report
from launcher.restart import Recovery
from launcher.run_config import PHASES, LaunchConfig, RunConfig, load_run_config, parse_phases, write_run_config
from launcher.stages import NAMED, STAGES, Job, Stage, StageFailed
from trainer.rundir import RUN_CONFIG

# run's own names and the launch helpers that tests and benchmarks import from here
__all__ = ["MPI_KEEPALIVE", "HostUnreachable", "StageWalk", "StageFailed", "build_parser", "check_hosts",
           "child_env", "horovodrun_argv", "main"]


class StageWalk:
    """Runs the configured stages in order and records what ran in summary.json."""

    def __init__(self, cfg: RunConfig, config_path: Path, resume: bool, resume_with_changes: bool = False):
        self.cfg = cfg
        self.resume = resume
        work = Path(cfg.workdir).resolve()
        self.job = Job(cfg, config_path, work, Path(cfg.prepared).resolve() if cfg.prepared else work / "prepared",
                       resume_with_changes)
        self.workdir, self.prepared = self.job.workdir, self.job.prepared
        self.stages = [stage for stage in STAGES if stage.name in cfg.phases]
        self.world = in_world.join(self.job, self.stages)
        self.rank = self.world.rank if self.world else 0
        self.markers = self.workdir / ".stages"
        self.children = None if self.world else Children(cfg.launch, self.markers)
        self.recovery = None if self.world else Recovery(cfg, self.markers)
        self.verified = False  # the prepared files re-hashed in this run (by its first run_dir stage)

    def argv(self, name: str, out_dir: Path, resume: bool = False, verify: bool = False) -> list[str]:
        """The command line (after `python`) the stage NAME is launched with."""
        return NAMED[name].argv(self.job, out_dir, resume, verify)

    def marker(self, stage: Stage) -> dict | None:
        try:
            return json.loads((self.markers / f"{stage.name}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def share(self, obj: Any, name: str) -> Any:
        """Rank 0's OBJ on every rank inside an MPI world; OBJ itself outside one."""
        return self.world.share(obj, name) if self.world else obj

    # -- running one stage ---------------------------------------------------------------------------
    def execute(self, stage: Stage, out_dir: Path, resume: bool, extra: tuple[str, ...] = ()) -> Any:
        """Run the stage: inside an MPI world a stage of every rank as its function (returning its summary),
        else its CLI as a child (returning None: its figures are read back from its files)."""
        verify = stage.run_dir and not self.verified
        self.verified |= verify
        if self.world and stage.in_world:
            return in_world.run_here(stage, self.job, out_dir, resume, verify)
        cmd = [sys.executable, *stage.argv(self.job, out_dir, resume, verify), *extra]
        if self.world:
            code = self.world.on_rank0(stage.name, cmd)
            if code:
                raise StageFailed(stage.name, code)
        elif stage.in_world is None:
            self.children.run(stage.name, cmd, every_rank=False)
        else:
            self.launch_ranks(stage, out_dir, resume, verify, extra)
        return None

    def launch_ranks(self, stage: Stage, out_dir: Path, resume: bool, verify: bool, extra: tuple[str, ...]) -> None:
        """Run the stage on every rank under horovodrun; one that lost a host or rank is relaunched with --resume
        on the hosts that answer, as long as launch.max_restarts allows (launcher/restart.py)."""
        while True:
            job = self.recovery.job(self.job, self.children, stage.name, trains=stage.run_dir)
            cmd = [sys.executable, *stage.argv(job, out_dir, resume, verify), *extra]
            try:
                self.children.run(stage.name, cmd, every_rank=True)
                return
            except StageFailed as failure:
                self.children = self.recovery.recover(stage.name, failure, self.children,
                                                      out_dir if stage.run_dir else None)
            resume = (out_dir / RUN_CONFIG).exists()  # the trainer's record: there is a run to continue

    def execute_self_checking(self, stage: Stage, out_dir: Path, resume: bool) -> bool:
        """Run a stage that decides itself whether it is up to date; True if it left its output as it was.
        One that refused to replace an output the launcher owns is run once more with its rebuild flags."""
        before = stage.self_check(self.job)
        try:
            self.execute(stage, out_dir, resume)
        except StageFailed:
            rebuild = stage.rebuild
            if before is None or rebuild is None or not rebuild.owned(self.job):
                raise
            print(f"[run] {stage.name}: {rebuild.note(self.job)}", flush=True)
            self.execute(stage, out_dir, resume, rebuild.flags)
        return before == stage.self_check(self.job)

    def complete(self, stage: Stage, target: Path) -> dict | None:
        """The stage's recorded figures if it ran with this config (its marker holds the key) and its outputs
        are all there; None when it must run."""
        key, marker = stage.key(self.job), self.marker(stage)
        if stage.outputs is None or not marker or marker.get("key") != key:
            return None
        return marker.get("figures", {}) if all(p.is_file() for p in stage.outputs(self.job, target)) else None

    def plan(self, stage: Stage, target: Path) -> dict:
        """Whether the stage runs ('skip' with its recorded figures), in which directory and with --resume;
        begins a run directory. On rank 0 only inside an MPI world: one decision, shared."""
        figures = self.complete(stage, target)
        if figures is not None:
            return {"skip": True, "figures": figures}
        out_dir = workdir.stage_dir(target, self.resume) if stage.run_dir else target
        if stage.run_dir:
            workdir.begin(out_dir, target, self.resume)
        return {"skip": False, "out_dir": str(out_dir), "resume": self.resume and (out_dir / "config.json").exists()}

    def run_stage(self, stage: Stage) -> dict:
        """Run one stage unless it is complete; return its figures for summary.json."""
        target = stage.target(self.job)
        plan = self.share(self.plan(stage, target) if self.rank == 0 else None, f"{stage.name}.plan")
        if plan["skip"]:
            print(f"[run] {stage.name}: up to date, skipped", flush=True)
            return {**plan["figures"], "status": "skipped"}
        out_dir = Path(plan["out_dir"])
        print(f"[run] == stage {stage.name} ==", flush=True)
        start = time.time()
        result = None
        if stage.self_check is None:
            result = self.execute(stage, out_dir, plan["resume"])
        elif (self.execute_self_checking(stage, out_dir, plan["resume"]) and (marker := self.marker(stage))
              and marker.get("key") == stage.key(self.job)):
            print(f"[run] {stage.name}: up to date, skipped", flush=True)
            return {**marker.get("figures", {}), "status": "skipped"}
        if stage.run_dir and self.rank == 0:
            workdir.finish(out_dir, target)
        figures = {"status": "ran", "wall_seconds": round(time.time() - start, 2)}
        if self.rank != 0:  # only rank 0 records figures: the others would read the same files for nothing
            return figures
        figures.update(result.figures() if result is not None else stage.figures(self.job, target))
        if figures.get("images"):  # a stage that goes through images: its rate over the stage's wall time
            figures["images_per_sec_wall"] = round(figures["images"] / max(figures["wall_seconds"], 1e-9), 1)
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.markers / f"{stage.name}.json",
                          json.dumps({"key": stage.key(self.job), "figures": figures}, indent=2))
        return figures

    # -- before anything is written --------------------------------------------------------------------
    def check_launch(self) -> None:
        """Outside an MPI world, when a stage runs under horovodrun: its hosts, before anything is written."""
        if self.children and any(stage.in_world for stage in self.stages):
            self.children.check()

    def check_inputs(self) -> None:
        """What the stages need, checked before anything is written or removed; exit 2 naming the path."""
        sources = [stage.check_source for stage in self.stages if stage.check_source]
        for check in sources:
            check(self.job)
        if self.stages and not sources:
            read_manifest(self.prepared)  # InputError naming PREP/manifest.json
        if os.path.lexists(self.workdir) and not self.workdir.is_dir():
            raise InputError(f"workdir {self.workdir}: exists and is not a directory")
        for stage in self.stages:
            if stage.run_dir:
                workdir.stage_dir(stage.target(self.job), self.resume)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Check the inputs, then hold WORKDIR's writer lock (rank 0 only, which writes what the ranks share)."""
        self.check_inputs()
        if self.rank != 0:
            yield
            return
        with lock_dir(self.workdir, "workdir"):
            yield

    # -- the whole run -------------------------------------------------------------------------------
    def run(self) -> dict:
        """All configured stages in order; summary.json and the report on rank 0."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # the record of what ran; the stages get their options as arguments, not from it
            write_run_config(self.cfg, self.workdir / "run-config.yaml")
        summary: dict[str, Any] = {"config": str(self.job.config_path), "workdir": str(self.workdir),
                                   "prepared": str(self.prepared), "phases": self.cfg.phases,
                                   "launch": self.cfg.to_dict()["launch"], "in_mpi_world": bool(self.world),
                                   "stages": {}}
        old = self.workdir / "summary.json"
        if self.rank == 0 and old.exists():
            try:
                summary["stages"] = json.loads(old.read_text()).get("stages", {})
            except json.JSONDecodeError:
                pass
        started = time.time()
        for i, stage in enumerate(self.stages, start=1):
            if self.rank == 0:
                print(f"[run] stage {i}/{len(self.stages)}: {stage.name}", flush=True)
            summary["stages"][stage.name] = self.run_stage(stage)
        summary["wall_seconds"] = round(time.time() - started, 2)
        if self.recovery and self.recovery.records:
            summary["restarts"] = self.recovery.records
        if self.rank == 0:
            for stage in STAGES:
                for key, figure in stage.headline.items():
                    summary[key] = summary["stages"].get(stage.name, {}).get(figure)
            if self.job.submission.exists():
                summary["submission"] = str(self.job.submission)
            report = write_report(self.workdir, summary)
            if report:
                summary["report"] = str(report)
            atomic_write_text(self.workdir / "summary.json", json.dumps(summary, indent=2))
        return summary


def build_parser() -> argparse.ArgumentParser:
    """The run command line: the config, its path flags, LaunchConfig's flags and key=value overrides."""
    p = Parser(prog="cifar10-hvd run", description=__doc__.splitlines()[0],
               epilog="Overrides: key=value pairs after the flags, e.g. train.epochs=3 launch.np=4 "
                      "(a bare key works when only one section has it).")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--data", help="Kaggle download: directory, directory of train.7z/test.7z, or the competition zip")
    p.add_argument("--workdir", help="run directory (default: the config's workdir)")
    p.add_argument("--prepared", help="an existing prepared directory on shared storage (default: WORKDIR/prepared)")
    add_flags(p, LaunchConfig)
    p.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--resume", action="store_true", help="continue a stage that was cut off from its last checkpoint")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="--resume, allowed to change training keys (train --resume-with-changes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """The file, then its overrides, then the flags (set as values, never re-parsed as YAML)."""
    cfg = load_run_config(args.config, args.overrides)
    for key in ("data", "workdir", "prepared"):
        if getattr(args, key):
            setattr(cfg, key, os.path.abspath(getattr(args, key)))
    cfg.launch = apply_flags(LaunchConfig, args, cfg.launch)
    if args.phases:
        cfg.phases = parse_phases(args.phases, "--phases")
    return cfg


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_run_config(args)
    walk = StageWalk(cfg, Path(args.config), args.resume or args.resume_with_changes, args.resume_with_changes)
    try:
        walk.check_launch()
        # outside an MPI world a signal ends the running stage's whole process tree, then the launcher
        with nullcontext() if walk.world else child.stop_on_signals(), walk.writing():
            summary = walk.run()
    except child.Stopped as e:
        print(f"cifar10-hvd run: {e}; the running stage and all its processes were ended "
              "(pass --resume to continue a training stage from its last checkpoint)", file=sys.stderr)
        return e.exit_status
    except StageFailed as e:
        print(f"cifar10-hvd run: {e}; the run stopped there (see the stage's messages above)", file=sys.stderr)
        return e.code if 0 < e.code < 256 else 1
    except HostUnreachable as e:
        print(f"cifar10-hvd run: {e}", file=sys.stderr)
        return 1
    if walk.rank == 0:
        print(f"[run] done in {summary['wall_seconds']:.0f} s")
        if summary.get("tune_valid_acc") is not None:
            print(f"[run] tune valid accuracy: {summary['tune_valid_acc']:.4f}")
        for key in ("submission", "report"):
            if key in summary:
                print(f"[run] {key}: {summary[key]}")
        print(f"[run] summary: {Path(summary['workdir']) / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 on success, 2 on bad input (config, flags), the failing stage's status otherwise."""
    return in_world.leave(run_command("run", lambda: _main(argv)))
