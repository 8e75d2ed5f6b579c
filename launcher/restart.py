"""Recovery of a stage that lost a host or a rank: `cifar10-hvd run --max-restarts N [--min-np M]`.

Outside an MPI world, a stage that runs on every rank under horovodrun (tune, final, predict) and fails is
judged here. It was LOST, and is relaunched, when
  - a rank's watchdog recorded a lost peer in the stage's fault file (trainer/watchdog.py: a rank killed,
    frozen or cut off; the supervisor then ends horovodrun/mpirun with status 75), or
  - a host of the job no longer answers `ssh HOST true` (launch.check_hosts) when the launcher looks again:
    a killed or cut-off host whose peers' connections broke before any watchdog spoke.
Never relaunched: bad input (exit status 2, e.g. a refused resume), a stage stopped by a signal to the
launcher, and a failure with no fault recorded while every host answers (the stage's own error, a rank's OOM
kill on a healthy host: it would fail again, with a larger per-rank batch rather than a smaller one).

A relaunch runs the stage with --resume (from its newest checkpoint: at most the epoch in progress is lost) on
the hosts that answer: the lost hosts' slots are dropped and np becomes min(launch.np, the slots left). A
host that answers but lost a rank (a frozen or killed rank) is kept. When fewer than min_np ranks would be
left, the lost hosts get RETURN_WAIT seconds to answer again (a rebooted node) and the job then continues on
the same hosts; otherwise the stage fails naming them. The run's global batch (train.batch_size x launch.np)
and learning rate (lr, times np with scale_lr) are kept: each rank gets global batch / ranks, and a world
size that does not divide the global batch is refused (exit 2) before anything is relaunched. The trainer's
resume check takes fewer ranks with the same global batch and LR as no change (trainer.config.resume_changes).
The stages after a restart run on the same reduced hosts.

Determinism: an epoch's sample order is one permutation per (seed, epoch) cut into global batches
(trainer.sharding), so every global batch holds the same images whatever the world size; which rank takes
which part of it, each rank's augmentation stream (seeded by seed, epoch and rank) and BatchNorm's per-rank
statistics do depend on the world size. A run is therefore reproducible for a given sequence of world sizes
and the epochs they began at (the restarts in summary.json), not identical to an uninterrupted run.

N restarts are a budget for the whole run. Each is printed as `[run] restart K/N of stage 'S': ...` and
recorded in summary.json's "restarts". Inside an MPI world (an MPIJob) nothing is relaunched here: Kubernetes
restarts the failed launcher (runPolicy.backoffLimit) and its command carries --resume.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from contracts.errors import InputError
from contracts.lock import DIR_LOCK, acquire
from launcher.launch import Children, HostUnreachable, check_hosts, first_slots, remote_hosts
from launcher.run_config import RunConfig, parse_hosts
from launcher.stages import Job, StageFailed
from trainer.config import read_run_record
from trainer.rundir import RUN_CONFIG, list_checkpoints
from trainer.schedule import base_lr
from trainer.watchdog import fault_lines

PROBE_SECONDS = 15.0  # a host that does not answer `ssh HOST true` in this long is lost
RETURN_WAIT = 60.0  # below min_np: how long the lost hosts get to answer again
RETURN_POLL = 5.0
RELEASE_WAIT = 30.0  # how long the cut-off ranks get to let go of the run directory's lock


def answering(hosts: list[str]) -> set[str]:
    """The hosts among HOSTS that answer ssh now (all probed at once); this host always does."""
    remote = remote_hosts(hosts)

    def answers(host: str) -> bool:
        try:
            check_hosts([host], timeout=PROBE_SECONDS)
        except HostUnreachable:
            return False
        return True

    with ThreadPoolExecutor(max_workers=min(32, len(remote) or 1)) as pool:
        silent = {h for h, ok in zip(remote, pool.map(answers, remote), strict=True) if not ok}
    return {h for h in hosts if h not in silent}


def lost_ranks(fault_file: Path) -> list[str]:
    """'rank R on HOST (no heartbeat for S s)' for each lost peer the stage's watchdogs recorded, once each."""
    seen: dict[tuple, str] = {}
    for rec in fault_lines(str(fault_file), 0):
        key = (rec.get("lost_rank"), str(rec.get("lost_host"))[:255])
        seen.setdefault(key, f"rank {key[0]} on {key[1]} lost (no heartbeat for {rec.get('silent_seconds')} s)")
    return list(seen.values())


def hosts_text(hosts: list[tuple[str, int]]) -> str:
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


class Recovery:
    """The restart policy of one `cifar10-hvd run` (see the module's docstring) and its record."""

    def __init__(self, cfg: RunConfig, markers: Path):
        launch = cfg.launch
        if launch.max_restarts and launch.min_np > launch.np:
            raise InputError(f"launch.min_np {launch.min_np} is more than launch.np {launch.np}: a restart could "
                             "never continue; lower min_np")
        self.launch, self.markers = launch, markers
        self.global_batch = cfg.train.batch_size * launch.np
        self.lr = base_lr(cfg.train, launch.np)
        self.records: list[dict] = []

    # -- what a launch on the current hosts gets ------------------------------------------------------------
    def per_rank_batch(self, stage: str, np_: int, hosts: str) -> int:
        """The global batch divided among NP_ ranks; InputError naming both numbers when it does not divide."""
        if self.global_batch % np_:
            raise InputError(f"stage '{stage}' cannot continue on {np_} ranks ({hosts}): the run's global batch "
                             f"{self.global_batch} is not divisible by {np_}; nothing was relaunched (resume with `cifar10-hvd run "
                             "--resume` on hosts whose ranks divide it, or choose a global batch that more world "
                             "sizes divide)")
        return self.global_batch // np_

    def job(self, job: Job, children: Children, stage: str, trains: bool) -> Job:
        """JOB as a stage is launched on CHILDREN's hosts: a training stage on fewer ranks than launch.np gets the
        run's global batch and LR (per-rank batch = global / ranks; lr fixed, scale_lr off)."""
        np_, train = children.launch.np, job.cfg.train
        if not trains:
            return job
        batch = self.per_rank_batch(stage, np_, children.hosts or f"localhost:{np_}")
        if batch == train.batch_size and base_lr(train, np_) == self.lr:
            return job  # the configured world (always so without a restart)
        train = dataclasses.replace(train, batch_size=batch, lr=self.lr, scale_lr=False)
        return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, train=train))

    # -- after a failure --------------------------------------------------------------------------------
    def recover(self, stage: str, failure: StageFailed, children: Children, run_dir: Path | None) -> Children:
        """The Children to relaunch STAGE with after FAILURE (recorded and printed), or raise: FAILURE itself
        when nothing was lost, bad input or no restarts allowed; a StageFailed naming what was lost when the
        restarts are spent or too few ranks are left; InputError when the global batch does not divide."""
        if not self.launch.max_restarts or failure.code == InputError.exit_status:
            raise failure
        print(f"[run] {stage}: {failure}; looking for a lost host or rank", flush=True)
        detected = time.time()
        hosts = [(name, slots or 1) for name, slots in parse_hosts(children.hosts)]  # [] = localhost:np
        up = answering([name for name, _ in hosts])
        gone = [name for name, _ in hosts if name not in up]
        why = "; ".join(lost_ranks(self.markers / f"{stage}.fault") + [f"{h} does not answer ssh" for h in gone])
        if not why:
            raise failure
        if len(self.records) >= self.launch.max_restarts:
            raise StageFailed(stage, failure.code, f"{why}; no restart left (--max-restarts "
                                                   f"{self.launch.max_restarts} used)")
        after = self.placement(stage, failure, hosts, gone, why)
        np_after = min(self.launch.np, sum(slots for _, slots in after)) if after else children.launch.np
        text = hosts_text(first_slots(after, np_after)) or children.hosts
        trains = run_dir is not None
        if trains:
            self.follow_record(run_dir)
        batch = self.per_rank_batch(stage, np_after, text or f"localhost:{np_after}") if trains else None
        if trains:
            self.released(run_dir)
        new = Children(dataclasses.replace(children.launch, np=np_after, hosts=text, hostfile=""), self.markers,
                       hosts=text)
        self.record(stage, failure, why, children, new, batch, run_dir, detected)
        return new

    def placement(self, stage: str, failure: StageFailed, hosts: list[tuple[str, int]], gone: list[str],
                  why: str) -> list[tuple[str, int]]:
        """The hosts to relaunch on: those that answer, or all of them once the lost ones answer again when the
        rest would be fewer than min_np ranks."""
        rest = [(name, slots) for name, slots in hosts if name not in gone]
        if not hosts or min(self.launch.np, sum(slots for _, slots in rest)) >= self.launch.min_np:
            return rest
        print(f"[run] {stage}: fewer than min_np {self.launch.min_np} ranks left without {', '.join(gone)}; "
              f"waiting up to {RETURN_WAIT:.0f} s for it to answer again", flush=True)
        end = time.monotonic() + RETURN_WAIT
        while time.monotonic() < end:
            time.sleep(RETURN_POLL)
            if set(gone) <= answering(gone):
                return hosts
        raise StageFailed(stage, failure.code, f"{why}; the {sum(s for _, s in rest)} slots left are fewer than "
                                               f"min_np {self.launch.min_np} and {', '.join(gone)} did not answer "
                                               f"again within {RETURN_WAIT:.0f} s")

    def follow_record(self, run_dir: Path) -> None:
        """The global batch and LR the cut-off run recorded (RUN/config.json, written as it started), which its
        resume must keep; the configured ones when it did not get that far."""
        if not (run_dir / RUN_CONFIG).is_file():
            return
        record = read_run_record(run_dir)
        self.global_batch = record.global_batch or record.train.batch_size * record.world_size
        self.lr = record.lr or base_lr(record.train, record.world_size)

    def released(self, run_dir: Path) -> None:
        """Wait for the cut-off ranks to let go of RUN_DIR's writer lock (Busy, exit 2, naming the holder if one
        still holds it after RELEASE_WAIT: e.g. rank 0 on a frozen host)."""
        if (run_dir / DIR_LOCK).is_file():
            acquire(run_dir / DIR_LOCK, f"run directory {run_dir}", patience=RELEASE_WAIT).release()

    def record(self, stage: str, failure: StageFailed, why: str, before: Children, after: Children,
               batch: int | None, run_dir: Path | None, detected: float) -> None:
        """Print the restart and keep it for summary.json."""
        # the newest checkpoint's epoch, where the trainer resumes (an epoch logged but not yet saved is redone)
        done = max((epoch for epoch, _ in list_checkpoints(run_dir)), default=0) if run_dir is not None else None
        rec = {"restart": len(self.records) + 1, "max_restarts": self.launch.max_restarts, "stage": stage,
               "time": datetime.fromtimestamp(detected, UTC).isoformat(timespec="seconds"),
               "reason": why, "exit_status": failure.code,
               "hosts_before": before.hosts or f"localhost:{before.launch.np}",
               "hosts_after": after.hosts or f"localhost:{after.launch.np}",
               "np_before": before.launch.np, "np_after": after.launch.np, "epochs_done": done}
        if batch is not None:
            rec.update(global_batch=self.global_batch, per_rank_batch=batch, lr=self.lr)
        self.records.append(rec)
        where = f" from epoch {done + 1}" if done is not None else ""
        sizes = (f" (np {rec['np_before']} -> {rec['np_after']}; global batch {self.global_batch} as "
                 f"{rec['np_after']} x {batch}, lr {self.lr:g} kept)" if batch and rec["np_before"] != rec["np_after"]
                 else "")
        print(f"[run] restart {rec['restart']}/{rec['max_restarts']} of stage '{stage}': {why}; resuming on "
              f"{rec['hosts_after']}{where}{sizes}", flush=True)

