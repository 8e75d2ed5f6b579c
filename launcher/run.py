"""`cifar10-hvd run`: the whole job (prepare, tune, final, predict) from one YAML config.

Outside an MPI world it starts each stage itself: `prepare` as one process, the
training and predict stages through `horovodrun` (the exact command is printed so it
can be copied). Inside one (started by horovodrun, mpirun or an MPIJob launcher) it
runs the stages in-process on every rank instead of launching again. Each finished
stage leaves a marker with a hash of the config it ran with (and of the prepared data it
read); a re-run skips stages whose marker matches and whose outputs are complete. Prepare
always runs: it answers "up to date" itself, from the source's fingerprint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from contracts.errors import INPUT_ERROR_FILE, InputError, run_command
from contracts.files import atomic_write_text
from contracts.labels import read_table
from contracts.lock import lock_dir
from contracts.schema import Parser, add_flags, apply_flags, to_argv
from data_prep import read_manifest
from launcher import child, workdir
from launcher.report import write_report
from launcher.run_config import (
    PHASES,
    LaunchConfig,
    RunConfig,
    load_run_config,
    parse_hostfile,
    parse_hosts,
    parse_phases,
    write_run_config,
)
from trainer.device import mpi_world
from trainer.rundir import FINAL_PARAMS, read_metrics
from trainer.train import run_figures

TRAIN_STAGES = ("tune", "final")  # each writes a trainer run dir WORKDIR/<stage>
# the stage's subcommand, whose name prefixes its messages when its function runs in-process inside an MPI world
IN_PROCESS = {"tune": "train", "final": "train", "predict": "predict"}


def horovodrun_argv(np_: int, cmd: list[str], controller: str = "gloo", hosts: str = "", hostfile: str = "") -> list[str]:
    """horovodrun -np N (-H HOSTS | --hostfile F | -H localhost:N) --gloo|--mpi CMD (the venv's horovodrun).

    On localhost under MPI, --oversubscribe lets -np exceed the core count, as Gloo allows.
    """
    argv = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_)]
    if hosts:
        argv += ["-H", hosts, f"--{controller}"]
    elif hostfile:
        argv += ["--hostfile", hostfile, f"--{controller}"]
    else:
        argv += ["-H", f"localhost:{np_}", f"--{controller}"] + (["--mpi-args=--oversubscribe"] if controller == "mpi" else [])
    return argv + list(cmd)


# A node lost without a word (cable cut, kernel panic) ends an MPI job only when Open MPI's daemons notice,
# through TCP keepalive: 300 s + 9 probes x 20 s by default, while its orted and ranks hang on. These make it
# about 20 s (a partitioned host's orted then ends its ranks too). Gloo's peers time out on their own
# (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s).
MPI_KEEPALIVE = {"OMPI_MCA_oob_tcp_keepalive_time": "10", "OMPI_MCA_oob_tcp_keepalive_intvl": "3",
                 "OMPI_MCA_oob_tcp_keepalive_probes": "3"}


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: the venv first on PATH, Open MPI allowed to run as root
    (containers and CI run as root; Open MPI refuses unless told) and told to notice lost nodes
    (MPI_KEEPALIVE; a value set by the user wins), then extra."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    for key, value in MPI_KEEPALIVE.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


class HostUnreachable(RuntimeError):
    """A host of -H / --hostfile does not answer ssh: the job cannot start there."""


def launch_hosts(launch: LaunchConfig) -> list[tuple[str, int | None]]:
    """LAUNCH's hosts as (name, slots or None): -H's entries, else the hostfile's (read and checked now)."""
    if launch.hosts:
        return parse_hosts(launch.hosts)
    return parse_hostfile(launch.hostfile) if launch.hostfile else []


def horovodrun_hosts(launch: LaunchConfig, hosts: list[tuple[str, int | None]]) -> str:
    """horovodrun's -H value for HOSTS ('' for none: localhost), every slot count written out (1 where none is
    given, as mpirun counts a bare host). A hostfile's hosts go as -H too: horovodrun's own hostfile reader
    takes no comments, blank lines or HOST:SLOTS. InputError when horovodrun cannot place np ranks on them."""
    if not hosts:
        return ""
    where = f"hosts {launch.hosts!r}" if launch.hosts else f"hostfile {launch.hostfile}"
    ipv6 = [name for name, _ in hosts if ":" in name]
    if ipv6:
        raise InputError(f"{where}: horovodrun -H takes host names and IPv4 addresses, not the IPv6 address "
                          f"{ipv6[0]}; give that host a name (e.g. in /etc/hosts)")
    slots = sum(n or 1 for _, n in hosts)
    if launch.np > slots:
        raise InputError(f"{launch.np} ranks (np) do not fit the {slots} slots of {where}; lower np or give "
                          "the hosts more slots (HOST:SLOTS)")
    return ",".join(f"{name}:{n or 1}" for name, n in hosts)


def remote_hosts(names: list[str]) -> list[str]:
    """The hosts among NAMES that horovodrun reaches over ssh: all but this one, each once."""
    local = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    return [h for h in dict.fromkeys(names) if h not in local]


def check_hosts(hosts: list[str], timeout: float = 20) -> None:
    """Raise HostUnreachable naming each host that `ssh HOST true` cannot reach (all tried at once),
    so a down host fails the run in seconds, before anything is written, not at the first horovodrun.
    `--` ends ssh's options: whatever a host name holds, ssh takes it as the host."""
    def probe(host: str) -> str | None:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=no",
               "--", host, "true"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{host} (no answer in {timeout:.0f} s)"
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return None if proc.returncode == 0 else f"{host} ({last})"

    with ThreadPoolExecutor(max_workers=min(32, len(hosts) or 1)) as pool:
        failed = [f for f in pool.map(probe, hosts) if f]
    if failed:
        raise HostUnreachable("cannot reach " + "; ".join(failed) + " over ssh; nothing was started or written")


class StageFailed(RuntimeError):
    """A stage exited non-zero; carries its name, exit status and, for bad input, the first rank's message."""

    def __init__(self, stage: str, code: int, reason: str = ""):
        super().__init__(f"stage '{stage}' failed (exit status {code})" + (f": {reason}" if reason else ""))
        self.stage, self.code = stage, code


def read_input_error(report: Path) -> str:
    """The first line a rank wrote to REPORT (INPUT_ERROR_FILE) when it ended on bad input; '' if none did."""
    try:
        with open(report, errors="replace") as f:
            return f.readline(4096).strip() or "bad input (see the messages above)"
    except OSError:
        return ""


class Pipeline:
    """Runs the configured phases in order and records what ran in summary.json."""

    resume_with_changes = False  # a resumed train stage may change training keys (train --resume-with-changes)

    def __init__(self, cfg: RunConfig, config_path: Path, resume: bool):
        self.cfg = cfg
        self.resume = resume
        self.workdir = Path(cfg.workdir).resolve()
        self.prepared = Path(cfg.prepared).resolve() if cfg.prepared else self.workdir / "prepared"
        self.world = mpi_world()
        self.rank = self.world[0] if self.world else 0
        self.resolved_config = self.workdir / "run-config.yaml"
        self.markers = self.workdir / ".stages"
        self.python = sys.executable
        self.config_path = config_path
        self.hvd = None  # Horovod, once a decision has been shared inside an MPI world
        self.shared = 0  # decisions shared so far (each broadcast gets its own name)
        self.hosts = ""  # horovodrun's -H (check_launch); '' for localhost:NP
        self.verified = False  # the prepared files re-hashed in this run (by its first training stage)

    # -- config identity -------------------------------------------------------------------------
    def data_identity(self) -> dict:
        """What the prepared data is (its files' sha256s and splits): a rebuilt PREP re-runs every later stage."""
        manifest = read_manifest(self.prepared)
        files = {name: entry.get("sha256") for name, entry in manifest.get("files", {}).items()}
        return {"files": files, "splits": manifest.get("splits"), "classes": manifest.get("classes")}

    def stage_key(self, stage: str) -> str:
        """Hash of everything that determines a stage's output (and its inputs' keys)."""
        d = self.cfg.to_dict()
        parts: dict[str, Any] = {"prepare": {"data": self.cfg.data, "prepared": str(self.prepared), **d["prepare"]}}
        if stage != "prepare":
            parts["tune"] = {"data": self.data_identity(), "train": d["train"]}
            parts["final"] = parts["tune"]
            parts["predict"] = {"prev": parts["final"], "predict": d["predict"]}
        blob = json.dumps({"stage": stage, **parts[stage]}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def marker(self, stage: str) -> dict | None:
        path = self.markers / f"{stage}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def complete(self, stage: str, marker: dict | None, key: str) -> bool:
        """The stage ran with this config (its marker holds key) and its outputs are all there."""
        if not marker or marker.get("key") != key or stage == "prepare":  # prepare decides that itself
            return False
        if stage in TRAIN_STAGES:
            return (self.workdir / stage / FINAL_PARAMS).is_file()
        return (self.workdir / "submission.csv").is_file()

    # -- launching ---------------------------------------------------------------------------------
    def execute(self, stage: str, out_dir: Path, resume: bool):
        """Run a stage: through its function inside an MPI world (returning its summary), else its CLI as a
        (horovodrun) child (returning None: its figures are read back from its files)."""
        distributed = stage != "prepare"
        verify = stage in TRAIN_STAGES and not self.verified
        self.verified |= verify
        if self.world and distributed:
            return self.call_in_process(stage, out_dir, resume, verify)
        cmd = [self.python, *self.argv(stage, out_dir, resume, verify)]
        if distributed:
            launch = self.cfg.launch
            cmd = horovodrun_argv(launch.np, cmd, launch.controller, self.hosts)
        self.launch_child(stage, cmd)
        return None

    def launch_child(self, stage: str, cmd: list[str]) -> None:
        """A child stage: inside an MPI world on rank 0 while the other ranks wait, else spawned here."""
        if self.world:
            code = self.on_rank0(stage, cmd)
            if code:
                raise StageFailed(stage, code)
        else:
            self.spawn(stage, cmd)

    def spawn(self, stage: str, cmd: list[str]) -> None:
        """Run CMD as the stage's child (printed, so it can be copied); StageFailed unless it exits 0, with
        status 2 when a rank ended on bad input (horovodrun itself exits 1 for any failed rank)."""
        print(f"[run] {stage}: {shlex.join(cmd)}", flush=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        report = self.markers / f"{stage}.input-error"  # on WORKDIR, which every host of the job shares
        report.unlink(missing_ok=True)
        code = child.call(cmd, env=child_env(**{INPUT_ERROR_FILE: str(report)}))
        reason = read_input_error(report) if code else ""
        report.unlink(missing_ok=True)
        if code:
            raise StageFailed(stage, InputError.exit_status if reason else code, reason)

    def call_in_process(self, stage: str, out_dir: Path, resume: bool, verify: bool = False):
        """The stage's function on this rank (train -> RunSummary, predict -> SubmissionSummary), its errors
        reported as its CLI would (`cifar10-hvd train: ...`, exit 2 for bad input) and raised as StageFailed."""
        if stage in TRAIN_STAGES:
            from trainer.train import train

            def body():
                return train(self.prepared, out_dir, self.cfg.train, phase=stage, resume=resume, verify=verify,
                             allow_changes=self.resume_with_changes)
        else:
            from predictor.predict import predict

            def body():
                return predict(self.prepared, self.workdir / "final", self.workdir / "submission.csv", self.cfg.predict)
        results: list = []
        code = run_command(IN_PROCESS[stage], lambda: results.append(body()) or 0)
        if code:
            raise StageFailed(stage, code)
        return results[0]

    # -- collective decisions (inside an MPI world) -------------------------------------------------
    def share(self, obj: Any, name: str) -> Any:
        """Rank 0's obj on every rank (Horovod's broadcast; under mpirun and under horovodrun --gloo alike):
        ranks that decided from their own view of the files could disagree and hang in the collectives."""
        if not self.world or self.world[1] == 1:
            return obj
        if self.hvd is None:
            from trainer.device import init_horovod, set_cpu_threads

            # before mxnet is imported: the threads of the first in-process stage, which would set them
            first = self.cfg.train if set(self.cfg.phases) & set(TRAIN_STAGES) else self.cfg.predict
            set_cpu_threads(first.threads)
            self.hvd = init_horovod()
        import mxnet as mx

        self.shared += 1
        obj = self.hvd.broadcast_object(obj, root_rank=0, name=f"run.{name}.{self.shared}")
        mx.nd.waitall()  # rank 0's broadcast is asynchronous: it must not exit before the others received it
        return obj

    def on_rank0(self, stage: str, cmd: list[str]) -> int:
        """Run cmd on rank 0 while the other ranks wait; every rank returns its exit status. Rank 0 shares
        'still running' every 2 s, so no rank blocks long in one collective (Horovod's stall warnings)."""
        proc = None
        if self.rank == 0:
            print(f"[run] {stage}: {shlex.join(cmd)} (rank 0; the other ranks wait)", flush=True)
            proc = subprocess.Popen(cmd, env=child_env())
        while True:
            code = self.share(proc.poll() if proc else None, f"{stage}.exit")
            if code is not None:
                return code
            if proc:
                time.sleep(2)

    # -- stages --------------------------------------------------------------------------------------
    def argv(self, stage: str, out_dir: Path, resume: bool = False, verify: bool = False) -> list[str]:
        """The stage's command line (after `python`), its options built from its section's class; VERIFY: a
        training stage re-hashes the prepared files first (rank 0; sizes are checked always)."""
        if stage == "prepare":
            if not self.cfg.data:
                raise InputError(f"{self.config_path}: phase 'prepare' needs 'data' (or --data SRC)")
            return ["-m", "data_prep", "--data", self.cfg.data, "--out", str(self.prepared), *to_argv(self.cfg.prepare)]
        if stage in TRAIN_STAGES:
            a = ["-m", "trainer", "--prepared", str(self.prepared), "--out", str(out_dir), "--phase", stage]
            resume_flag = "--resume-with-changes" if self.resume_with_changes else "--resume"
            return a + ([resume_flag] if resume else []) + (["--verify"] if verify else []) + to_argv(self.cfg.train)
        return ["-m", "predictor.predict", "--prepared", str(self.prepared), "--model", str(self.workdir / "final"),
                "--out", str(self.workdir / "submission.csv"), *to_argv(self.cfg.predict)]

    def prepare(self) -> bool:
        """Run prepare, which itself answers "up to date"; True if it left PREP's data as it was.

        The launcher's own PREP (WORKDIR/prepared, no --prepared given) prepared from other data or with
        other parameters is rebuilt (prepare --force builds beside it and renames); a given one is not.
        """
        try:
            before = self.data_identity()
        except InputError:
            before = None
        try:
            self.execute("prepare", self.workdir, False)
        except StageFailed:
            if self.cfg.prepared or before is None:
                raise
            print(f"[run] prepare: {self.prepared} is not what {self.cfg.data} and the prepare section make "
                  "now; rebuilding it (prepare --force)", flush=True)
            self.launch_child("prepare", [self.python, *self.argv("prepare", self.workdir), "--force"])
        return before == self.data_identity()

    def plan(self, stage: str, target: Path) -> dict:
        """Whether the stage runs ('skip' with its recorded figures), in which directory and with --resume;
        begins a training stage's directory. On rank 0 only inside an MPI world: one decision, shared."""
        key, marker = self.stage_key(stage), self.marker(stage)
        if self.complete(stage, marker, key):
            return {"skip": True, "figures": marker.get("figures", {})}
        out_dir = workdir.stage_dir(target, self.resume) if stage in TRAIN_STAGES else target
        if stage in TRAIN_STAGES:
            workdir.begin(out_dir, target, self.resume)
        return {"skip": False, "out_dir": str(out_dir), "resume": self.resume and (out_dir / "config.json").exists()}

    def run_stage(self, stage: str) -> dict:
        """Run one stage unless it is complete; return its figures for summary.json."""
        target = self.workdir / stage if stage in TRAIN_STAGES else self.workdir
        plan = self.share(self.plan(stage, target) if self.rank == 0 else None, f"{stage}.plan")
        if plan["skip"]:
            print(f"[run] {stage}: up to date, skipped", flush=True)
            return {**plan["figures"], "status": "skipped"}
        out_dir = Path(plan["out_dir"])
        print(f"[run] == stage {stage} ==", flush=True)
        start = time.time()
        result = None
        if stage != "prepare":
            result = self.execute(stage, out_dir, plan["resume"])
        elif self.prepare() and (marker := self.marker(stage)) and marker.get("key") == self.stage_key(stage):
            print("[run] prepare: up to date, skipped", flush=True)
            return {**marker.get("figures", {}), "status": "skipped"}
        if stage in TRAIN_STAGES and self.rank == 0:
            workdir.finish(out_dir, target)
        figures = {"status": "ran", "wall_seconds": round(time.time() - start, 2)}
        if self.rank != 0:  # only rank 0 records figures: the others would read the same files for nothing
            return figures
        figures.update(result.figures() if result is not None else self.figures(stage, target))
        if stage in ("prepare", "predict") and figures.get("images"):
            figures["images_per_sec_wall"] = round(figures["images"] / max(figures["wall_seconds"], 1e-9), 1)
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.markers / f"{stage}.json",
                          json.dumps({"key": self.stage_key(stage), "figures": figures}, indent=2))
        return figures

    def figures(self, stage: str, out_dir: Path) -> dict:
        """Figures read back from a finished stage's outputs (a stage run as a child process)."""
        if stage == "prepare":
            return read_manifest(self.prepared).figures()
        if stage == "predict":
            rows = len(read_table(self.workdir / "submission.csv").ids)
            return {"images": rows, "submission": str(self.workdir / "submission.csv")}
        return run_figures(stage, read_metrics(out_dir))

    def check_launch(self) -> None:
        """Outside an MPI world, before anything is written (the lock included): the hosts horovodrun will get
        (a hostfile read and checked) and every remote one answering ssh."""
        if self.world or not set(self.cfg.phases) - {"prepare"}:
            return
        hosts = launch_hosts(self.cfg.launch)
        self.hosts = horovodrun_hosts(self.cfg.launch, hosts)
        check_hosts(remote_hosts([name for name, _ in hosts]))

    def check_inputs(self) -> None:
        """What the phases need, checked before anything is written or removed; exit 2 naming the path."""
        phases = self.cfg.phases
        if "prepare" in phases:
            if not self.cfg.data:
                raise InputError(f"{self.config_path}: phase 'prepare' needs 'data' (or --data SRC)")
            if not os.path.lexists(self.cfg.data):
                raise InputError(f"data {self.cfg.data}: no such file or directory")
        elif phases:
            read_manifest(self.prepared)  # InputError naming PREP/manifest.json
        if os.path.lexists(self.workdir) and not self.workdir.is_dir():
            raise InputError(f"workdir {self.workdir}: exists and is not a directory")
        for stage in TRAIN_STAGES:
            if stage in phases:
                workdir.stage_dir(self.workdir / stage, self.resume)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Check the inputs, then hold WORKDIR's writer lock (rank 0 only, which writes what the ranks share)."""
        self.check_inputs()
        if self.rank != 0:
            yield
            return
        with lock_dir(self.workdir, "workdir"):
            yield

    def run(self) -> dict:
        """All configured phases in order; summary.json and the report on rank 0."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # the record of what ran; the stages get their options as arguments, not from it
            write_run_config(self.cfg, self.resolved_config)
        summary: dict[str, Any] = {"config": str(self.config_path), "workdir": str(self.workdir),
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
        for i, stage in enumerate(self.cfg.phases, start=1):
            if self.rank == 0:
                print(f"[run] stage {i}/{len(self.cfg.phases)}: {stage}", flush=True)
            summary["stages"][stage] = self.run_stage(stage)
        summary["wall_seconds"] = round(time.time() - started, 2)
        if self.rank == 0:
            tune = summary["stages"].get("tune", {})
            summary["tune_valid_acc"] = tune.get("valid_acc")
            if (self.workdir / "submission.csv").exists():
                summary["submission"] = str(self.workdir / "submission.csv")
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
    pipe = Pipeline(cfg, Path(args.config), args.resume or args.resume_with_changes)
    pipe.resume_with_changes = args.resume_with_changes
    try:
        pipe.check_launch()
        # outside an MPI world a signal ends the running stage's whole process tree, then the launcher
        with nullcontext() if pipe.world else child.stop_on_signals(), pipe.writing():
            summary = pipe.run()
    except child.Stopped as e:
        print(f"cifar10-hvd run: {e}; the running stage and all its processes were ended "
              "(pass --resume to continue a training stage from its last checkpoint)", file=sys.stderr)
        return e.exit_status
    except StageFailed as e:
        print(f"cifar10-hvd run: {e}; the pipeline stopped there (see the stage's messages above)", file=sys.stderr)
        return e.code if 0 < e.code < 256 else 1
    except HostUnreachable as e:
        print(f"cifar10-hvd run: {e}", file=sys.stderr)
        return 1
    if pipe.rank == 0:
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
    return run_command("run", lambda: _main(argv))
