"""The stages of `cifar10-hvd run`, each declared once in STAGES, in the order they run.

A Stage says what its skip key covers, how its command line is built, what its function is inside an MPI
world, what marks it complete and which figures it reports. launcher/run.py walks them without knowing
any by name.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.errors import InputError
from contracts.labels import read_table
from contracts.schema import alias_spelled, to_argv
from data_prep import read_manifest
from launcher.run_config import RunConfig
from trainer.rundir import FINAL_PARAMS, read_metrics
from trainer.train import run_figures


@dataclass(frozen=True)
class Job:
    """What every stage reads: the run config, where it came from, and the directories it resolves to."""

    cfg: RunConfig
    config_path: Path
    workdir: Path
    prepared: Path
    resume_with_changes: bool = False  # a resumed training stage may change training keys

    @property
    def submission(self) -> Path:
        return self.workdir / "submission.csv"

    @property
    def model(self) -> Path:
        """The run directory predict reads its model from: the final stage's."""
        return self.workdir / "final"


class StageFailed(RuntimeError):
    """A stage exited non-zero; carries its name, exit status and, for bad input, the first rank's message."""

    def __init__(self, stage: str, code: int, reason: str = ""):
        super().__init__(f"stage '{stage}' failed (exit status {code})" + (f": {reason}" if reason else ""))
        self.stage, self.code = stage, code


# argv(job, out_dir, resume, verify) -> the command line after `python`; VERIFY: re-hash the prepared files first
Argv = Callable[[Job, Path, bool, bool], list[str]]


@dataclass(frozen=True)
class InWorld:
    """A stage that runs on every rank: under horovodrun outside an MPI world, as this function inside one."""

    command: str  # the subcommand whose name prefixes its messages (`cifar10-hvd train: ...`), exit 2 for bad input
    call: Callable[[Job, Path, bool, bool], Any]  # (job, out_dir, resume, verify) -> a summary with .figures()
    threads: Callable[[Job], int]  # its CPU threads per rank (0: the default rule)


@dataclass(frozen=True)
class Rebuild:
    """A stage that refused to replace an output the launcher owns is run once more with FLAGS."""

    flags: tuple[str, ...]
    owned: Callable[[Job], bool]
    note: Callable[[Job], str]  # what is printed before the second run


@dataclass(frozen=True)
class Stage:
    """One stage of the run; `target` is the directory it writes (WORKDIR, or WORKDIR/<name> for a run_dir)."""

    name: str
    key_inputs: Callable[[Job], dict]  # everything that determines its output (and its inputs' keys)
    argv: Argv
    figures: Callable[[Job, Path], dict]  # (job, target): read back from its outputs after a child ran it
    in_world: InWorld | None = None  # None: one process, rank 0's child inside an MPI world
    # complete when its marker holds this config's key and these all exist; None: it always runs and
    # answers "up to date" itself (self_check)
    outputs: Callable[[Job, Path], list[Path]] | None = None
    # what its output is now (None where there is none): unchanged by a run whose marker matches = skipped
    self_check: Callable[[Job], Any] | None = None
    # it checks its source before anything is written; without such a stage the prepared data must exist
    check_source: Callable[[Job], None] | None = None
    rebuild: Rebuild | None = None
    # a trainer run directory WORKDIR/<name>: built beside one it replaces, resumable, and the first of a
    # run re-hashes the prepared files
    run_dir: bool = False
    headline: dict[str, str] = field(default_factory=dict)  # summary.json key -> one of its figures

    def key(self, job: Job) -> str:
        """Hash of the stage's name and key inputs: a marker holding another key means the stage must run."""
        blob = json.dumps({"stage": self.name, **self.key_inputs(job)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def target(self, job: Job) -> Path:
        return job.workdir / self.name if self.run_dir else job.workdir


def data_identity(prepared: Path) -> dict:
    """What the prepared data is (its files' sha256s and splits): a rebuilt PREP re-runs every later stage."""
    manifest = read_manifest(prepared)
    files = {name: entry.get("sha256") for name, entry in manifest.get("files", {}).items()}
    return {"files": files, "splits": manifest.get("splits"), "classes": manifest.get("classes")}


def _needs_data(job: Job) -> None:
    if not job.cfg.data:
        raise InputError(f"{job.config_path}: phase 'prepare' needs 'data' (or --data SRC)")


# -- prepare: one process; it decides itself from the source's fingerprint whether it is up to date --------

def _prepare_key(job: Job) -> dict:
    return {"data": job.cfg.data, "prepared": str(job.prepared), **job.cfg.to_dict()["prepare"]}


def _prepare_argv(job: Job, out_dir: Path, resume: bool, verify: bool) -> list[str]:
    _needs_data(job)
    return ["-m", "data_prep", "--data", job.cfg.data, "--out", str(job.prepared), *to_argv(job.cfg.prepare)]


def _prepared_now(job: Job) -> dict | None:
    try:
        return data_identity(job.prepared)
    except InputError:
        return None


def _check_source(job: Job) -> None:
    _needs_data(job)
    if not os.path.lexists(job.cfg.data):
        raise InputError(f"data {job.cfg.data}: no such file or directory")


PREPARE = Stage(
    name="prepare",
    key_inputs=_prepare_key,
    argv=_prepare_argv,
    figures=lambda job, target: read_manifest(job.prepared).figures(),
    self_check=_prepared_now,
    check_source=_check_source,
    # the launcher's own PREP (no --prepared given) prepared from other data or with other parameters is
    # rebuilt (prepare --force builds beside it and renames); a given one is not
    rebuild=Rebuild(flags=("--force",), owned=lambda job: not job.cfg.prepared,
                    note=lambda job: f"{job.prepared} is not what {job.cfg.data} and the prepare section make now; "
                                     "rebuilding it (prepare --force)"),
)


# -- tune and final: the trainer on every rank, each into a run directory of its own ------------------------

def _train_key(job: Job) -> dict:
    # values under the spelling their markers recorded (alias_spelled): a renamed value keeps a workdir up to date
    return {"data": data_identity(job.prepared), "train": alias_spelled(job.cfg.train)}


def _training(name: str, headline: dict[str, str] | None = None) -> Stage:
    def argv(job: Job, out_dir: Path, resume: bool, verify: bool) -> list[str]:
        a = ["-m", "trainer", "--prepared", str(job.prepared), "--out", str(out_dir), "--phase", name]
        resume_flag = "--resume-with-changes" if job.resume_with_changes else "--resume"
        return a + ([resume_flag] if resume else []) + (["--verify"] if verify else []) + to_argv(job.cfg.train)

    def call(job: Job, out_dir: Path, resume: bool, verify: bool):
        from trainer.train import train

        return train(job.prepared, out_dir, job.cfg.train, phase=name, resume=resume, verify=verify,
                     allow_changes=job.resume_with_changes)

    return Stage(
        name=name,
        key_inputs=_train_key,
        argv=argv,
        figures=lambda job, target: run_figures(name, read_metrics(target)),
        in_world=InWorld(command="train", call=call, threads=lambda job: job.cfg.train.threads),
        outputs=lambda job, target: [target / FINAL_PARAMS],
        run_dir=True,
        headline=headline or {},
    )


# -- predict: every rank labels its share of the test set with the final model ---------------------------------

def _predict_argv(job: Job, out_dir: Path, resume: bool, verify: bool) -> list[str]:
    return ["-m", "predictor.predict", "--prepared", str(job.prepared), "--model", str(job.model),
            "--out", str(job.submission), *to_argv(job.cfg.predict)]


def _predict(job: Job, out_dir: Path, resume: bool, verify: bool):
    from predictor.predict import predict

    return predict(job.prepared, job.model, job.submission, job.cfg.predict)


PREDICT = Stage(
    name="predict",
    key_inputs=lambda job: {"prev": _train_key(job), "predict": job.cfg.to_dict()["predict"]},
    argv=_predict_argv,
    figures=lambda job, target: {"images": len(read_table(job.submission).ids), "submission": str(job.submission)},
    in_world=InWorld(command="predict", call=_predict, threads=lambda job: job.cfg.predict.threads),
    outputs=lambda job, target: [job.submission],
)

STAGES = (PREPARE, _training("tune", headline={"tune_valid_acc": "valid_acc"}), _training("final"), PREDICT)
NAMED = {stage.name: stage for stage in STAGES}
