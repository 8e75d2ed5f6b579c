"""`d2l` names the d2l chapter's augmentation and pipeline; `seed`, their other spelling, keeps working everywhere."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from conftest import ROOT, run_cli

from contracts.schema import read_yaml
from trainer.config import TrainConfig, from_mapping, section

TINY = ["--width", "4", "--batch-size", "16", "--lr-period", "1", "--threads", "1"]


def _yaml_train(tmp_path: Path, name: str, value: str) -> TrainConfig:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"train:\n  augment: {value}\n  pipeline: {value}\n")
    return from_mapping(TrainConfig, section(read_yaml(path), "train", path), str(path))


def test_seed_and_d2l_spellings_give_the_same_train_config(tmp_path):
    old, new = _yaml_train(tmp_path, "old", "seed"), _yaml_train(tmp_path, "new", "d2l")
    assert old == new == TrainConfig(pipeline="d2l") == TrainConfig(augment="seed", pipeline="seed")
    assert (old.augment, old.pipeline) == ("d2l", "d2l")


def test_the_alias_is_shown_in_help_and_in_the_refusal_of_a_bad_value(prepared, tmp_path):
    helptext = " ".join(run_cli(["train", "--help"], check=True).stdout.split())
    assert "one of batched, d2l (seed: an alias of d2l)" in helptext
    assert "one of d2l, padcrop (seed: an alias of d2l)" in helptext
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(tmp_path / "r"), "--augment", "seeds"])
    assert proc.returncode == 2 and not (tmp_path / "r").exists()
    assert "--augment: key 'augment' must be one of d2l, padcrop (seed: an alias of d2l), got 'seeds'" in proc.stderr


def test_stage_keys_hash_the_spelling_they_were_first_recorded_with():
    from contracts.schema import alias_spelled
    from launcher.run_config import load_run_config

    train = load_run_config(ROOT / "configs" / "seed.yaml").train
    assert (train.augment, train.pipeline) == ("d2l", "d2l")
    expected = {**dataclasses.asdict(train), "augment": "seed", "pipeline": "seed"}
    for newer in ("stem_stride", "stem_pool", "stem_init", "flip", "bn_momentum", "time_budget"):  # newer than the first markers: left out at their defaults
        del expected[newer]
    assert alias_spelled(train) == expected


def _respell(record: Path, value: str) -> None:
    """Rewrite a run record's augment and pipeline as value, as a run made before `d2l` existed wrote them."""
    data = json.loads(record.read_text())
    data["train"].update(augment=value, pipeline=value)
    record.write_text(json.dumps(data, indent=1) + "\n")


def test_a_run_recorded_with_seed_resumes_as_d2l_without_changes(prepared, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", "--prepared", str(prepared), "--out", str(run), *TINY, "--epochs", "1", "--pipeline", "d2l"],
            check=True)
    for record in (run / "config.json", *(run / "checkpoints").glob("epoch-*.json")):
        _respell(record, "seed")
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(run), *TINY, "--epochs", "2",
                    "--pipeline", "d2l", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at epoch 2" in proc.stdout + proc.stderr
    record = json.loads((run / "config.json").read_text())
    assert record["changes"] == [] and (record["train"]["augment"], record["train"]["pipeline"]) == ("d2l", "d2l")
