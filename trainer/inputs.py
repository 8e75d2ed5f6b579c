"""The trainer's side of the prepared-directory contract: checked once, on rank 0, before any rank reads."""
from __future__ import annotations

from pathlib import Path

from contracts.errors import InputError


def verify_prepared(hvd, prepared: str | Path, hashes: bool) -> None:
    """Rank 0 checks the prepared dir (manifest against arrays and sizes; sha256 too with hashes) before
    any rank reads it; every rank raises the same InputError, so none is left waiting in a collective."""
    from data_prep.store import check, read_manifest, verify

    problem = ""
    if hvd.rank() == 0:
        try:
            check(prepared, read_manifest(prepared))
            differ = verify(prepared) if hashes else []
            if differ:
                problem = f"{prepared}: sha256 differs from the manifest for {', '.join(differ)}"
        except InputError as e:
            problem = str(e)
    if hvd.size() > 1:
        import mxnet as mx

        from trainer.collectives import broadcast_json

        problem = broadcast_json(problem, 0, "prepared.verify")
        # wait until every rank has the verdict (collectives are asynchronous): a rank that leaves ends Horovod
        hvd.allreduce(mx.nd.zeros(1), name="prepared.verified").wait_to_read()
    if problem:
        raise InputError(problem)
