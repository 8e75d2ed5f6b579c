"""One configuration schema: every entry point reads a section through the same class and validators,
and every bad value, flag or override is an InputError (exit 2, `cifar10-hvd <stage>: ...`) in-process."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, run_cli

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before mxnet is first imported in this process

from contracts.schema import to_argv  # noqa: E402
from data_prep import cli as prepare_cli  # noqa: E402
from data_prep.config import PrepareConfig  # noqa: E402
from launcher import cli, run_config  # noqa: E402
from launcher import run as run_mod  # noqa: E402
from predictor import predict as predict_mod  # noqa: E402
from trainer import train as train_mod  # noqa: E402


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    """cifar10-hvd ARGV in this process: (status, stderr)."""
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("text,expect", [
    ("train: {widht: 8}\n", "unknown key 'widht'"),
    ("train: {epochs: -1}\n", "key 'epochs' must be >= 1"),
    ("train: {lr: fast}\n", "key 'lr' must be a number"),
    ("prepare: {valid_ratio: 1.0}\n", "key 'valid_ratio' must be < 1.0"),
    ("prepare: {valid_ratio: -0.1}\n", "key 'valid_ratio' must be >= 0.0"),
    ("prepare: {workers: -1}\n", "key 'workers' must be >= 0"),
    ("predict: {threads: -1}\n", "key 'threads' must be >= 0"),
    ("launch: {controller: slurm}\n", "key 'controller' must be one of gloo, mpi"),
    ("tarin: {epochs: 1}\n", "unknown key 'tarin'"),
    ("phases: [prepare, sing]\n", "unknown phase(s) sing"),
    ("version: 2\n", "key 'version' is 2"),
    ("train: [1, 2\n", "not valid YAML"),
    ("train: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_config_errors_name_the_key_and_file(tmp_path, capsys, text, expect):
    cfg = write(tmp_path / "bad.yaml", text)
    status, err = run_main(capsys, ["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert status == 2
    assert err.startswith("cifar10-hvd run: ") and expect in err and str(cfg) in err, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,expect", [
    ("train.epochs=[1", "override 'train.epochs=[1': not valid YAML"),
    ("train.epochs=!!python/object/apply:os.system ['true']", "not valid YAML"),
    ("train.epochs=!!binary aGk=", "key 'epochs' must be an integer"),
    ("batch_size=3", "'batch_size' is in sections train, predict"),
    ("train.epochs", "expected key=value"),
    ("trian.epochs=3", "unknown section 'trian'"),
])
def test_override_errors_name_the_key(tmp_path, capsys, override, expect):
    # a malformed override is exit 2 naming it, never a traceback
    cfg = write(tmp_path / "ok.yaml", "train: {width: 4}\n")
    status, err = run_main(capsys, ["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), override])
    assert status == 2, err
    assert err.startswith("cifar10-hvd run: ") and expect in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()


# (section, key, value, message): each rejected identically by the run config, an override and the stage's own CLI
SAME_VERDICT = [
    ("prepare", "valid_ratio", 1.0, "key 'valid_ratio' must be < 1.0"),
    ("prepare", "seed", -1, "key 'seed' must be >= 0"),
    ("prepare", "classes", "cat,dog,cat", "'cat' is listed more than once"),
    ("train", "eval_crop", 31, "key 'eval_crop' must be one of"),
    ("train", "label_smoothing", 1.0, "key 'label_smoothing' must be < 1.0"),
    ("predict", "batch_size", 0, "key 'batch_size' must be >= 1"),
    ("predict", "threads", -2, "key 'threads' must be >= 0"),
    ("launch", "np", 0, "key 'np' must be >= 1"),
]
STAGE_CMD = {"prepare": ["prepare", "--data", "SRC", "--out", "OUT"], "train": ["train", "--prepared", "P", "--out", "R"],
             "predict": ["predict", "--prepared", "P", "--model", "M"], "launch": ["run"]}


@pytest.mark.parametrize("sect,key,value,expect", SAME_VERDICT)
def test_a_value_gets_the_same_verdict_from_every_entry_point(tmp_path, capsys, sect, key, value, expect):
    cfg = write(tmp_path / "c.yaml", yaml.safe_dump({sect: {key: value}}))
    flag = ["--" + key.replace("_", "-"), str(value)]
    ok = write(tmp_path / "ok.yaml", "train: {width: 4}\n")
    cases = {"run config": ["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")],
             "run override": ["run", "--config", str(ok), "--workdir", str(tmp_path / "w"), f"{sect}.{key}={value}"],
             "stage --config": [*STAGE_CMD[sect], "--config", str(cfg)],
             "stage flag": [*STAGE_CMD[sect], *flag]}
    if sect == "launch":
        cases["stage --config"] = cases["run config"]
        cases["stage flag"] = ["run", "--config", str(ok), "--workdir", str(tmp_path / "w"), *flag]
    for what, argv in cases.items():
        status, err = run_main(capsys, argv)
        assert status == 2 and expect in err, (what, err)
        stage = "run" if argv[0] == "run" else argv[0]
        assert err.startswith(f"cifar10-hvd {stage}: "), (what, err)
        if "config" in what:
            assert str(cfg) in err, (what, err)
    assert not (tmp_path / "w").exists()


def test_values_one_entry_point_took_are_taken_by_all(tmp_path):
    # valid_ratio 0 (prepare took it, the launcher refused it); workers 0 = all cores (prepare said None);
    # predict's threads (a flag outside PredictConfig, unknown to the run config)
    text = "prepare: {valid_ratio: 0, workers: 0, layout: packed}\npredict: {threads: 2}\n"
    cfg = run_config.load_run_config(write(tmp_path / "c.yaml", text))
    assert (cfg.prepare.valid_ratio, cfg.prepare.workers, cfg.predict.threads) == (0.0, 0, 2)
    args = prepare_cli.build_parser().parse_args(["--data", "S", "--out", "O", "--valid-ratio", "0", "--workers", "0",
                                                  "--layout", "packed"])
    assert prepare_cli.resolve(PrepareConfig, args, None, "prepare") == cfg.prepare
    args = predict_mod.build_parser().parse_args(["--prepared", "P", "--model", "M", "--config", str(tmp_path / "c.yaml")])
    assert predict_mod.resolve(predict_mod.PredictConfig, args, args.config, "predict").threads == 2


def test_prepare_argv_is_built_from_the_class(tmp_path):
    # the launcher's prepare argv comes from PrepareConfig, so it parses back to the same section
    cfg = run_config.load_run_config(write(tmp_path / "c.yaml", "data: /src\n"),
                                     ["prepare.valid_ratio=0.25", "prepare.seed=7", "prepare.workers=3",
                                      "prepare.layout=folders"])
    pipe = run_mod.StageWalk(cfg, tmp_path / "c.yaml", resume=False)
    argv = pipe.argv("prepare", pipe.workdir)
    assert argv[:2] == ["-m", "data_prep"] and argv[-len(to_argv(cfg.prepare)):] == to_argv(cfg.prepare)
    args = prepare_cli.build_parser().parse_args(argv[2:])
    assert prepare_cli.resolve(PrepareConfig, args, None, "prepare") == cfg.prepare
    assert (args.data, args.out) == ("/src", str(pipe.prepared))


def test_train_and_predict_argv_are_built_from_their_classes(tmp_path):
    # under horovodrun the stages get flags from their section's class, parsed back to the same sections
    from predictor.config import PredictConfig
    from trainer.config import TrainConfig

    cfg = run_config.load_run_config(write(tmp_path / "c.yaml", "data: /src\n"),
                                     ["train.epochs=3", "train.lr=0.05", "train.label_smoothing=0.1",
                                      "train.eval_crop=36", "train.amp=float16", "predict.tta=flip", "predict.threads=2"])
    pipe = run_mod.StageWalk(cfg, tmp_path / "c.yaml", resume=False)
    argv = pipe.argv("final", pipe.workdir / "final", resume=True)
    assert argv[:2] == ["-m", "trainer"] and "--config" not in argv
    args = train_mod.build_parser().parse_args(argv[2:])
    assert train_mod.resolve(TrainConfig, args, None, "train") == cfg.train
    assert (args.phase, args.resume, args.out) == ("final", True, str(pipe.workdir / "final"))
    argv = pipe.argv("predict", pipe.workdir)
    assert argv[:2] == ["-m", "predictor.predict"] and "--config" not in argv
    assert predict_mod.resolve(PredictConfig, predict_mod.build_parser().parse_args(argv[2:]), None, "predict") == cfg.predict


def test_run_config_is_a_versioned_record_read_back_through_the_schema(tmp_path):
    cfg = run_config.load_run_config(ROOT / "configs" / "demo.yaml", ["train.epochs=3", "launch.np=2"])
    run_config.write_run_config(cfg, tmp_path / "run-config.yaml")
    assert yaml.safe_load((tmp_path / "run-config.yaml").read_text())["version"] == run_config.RUN_CONFIG_VERSION
    back = run_config.load_run_config(tmp_path / "run-config.yaml")
    assert dataclasses.replace(back, source="") == dataclasses.replace(cfg, source="")


def test_bad_flags_in_process_return_2_not_system_exit(tmp_path, capsys):
    for argv, expect in [(["train", "--prepared", "P", "--out", "R", "--epochs", "x"], "--epochs: key 'epochs' must be an integer, got 'x'"),
                         (["predict", "--prepared", "P"], "required: --model"),
                         (["prepare", "--data", "S", "--out", "O", "--layout", "tree"], "--layout: key 'layout' must be one of packed, folders, got 'tree'"),
                         (["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--workdir", str(tmp_path / "w"), "--np", "two"], "--np: key 'np' must be an integer, got 'two'"),
                         (["score", "--submission", "s"], "required: --solution"),
                         (["demo-data"], "required: --out")]:
        status, err = run_main(capsys, argv)
        assert status == 2 and err.startswith(f"cifar10-hvd {argv[0]}: ") and expect in err, (argv, err)
    assert not (tmp_path / "w").exists()
    assert cli.main(["train", "--help"]) == 0
    assert "--eval-crop" in capsys.readouterr().out


def test_train_out_that_is_a_file_is_an_input_error(tmp_path, capsys):
    # exit 2 naming --out, never a raw FileExistsError
    out = write(tmp_path / "notadir", "mine\n")
    status, err = run_main(capsys, ["train", "--prepared", str(tmp_path), "--out", str(out)])
    assert status == 2 and err.startswith("cifar10-hvd train: ") and f"{out}: --out exists and is not a directory" in err
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("damage", ["16x16 images", "short labels"])
def test_bad_prepared_arrays_leave_no_run_dir(prepared, tmp_path, capsys, damage):
    # the arrays are checked before config.json or metrics.jsonl is written, so no half-made run dir
    # demands --resume afterwards
    import shutil

    prep = tmp_path / "prep"
    shutil.copytree(prepared, prep)
    if damage == "16x16 images":
        images = np.load(prep / "trainval_images.npy")
        np.save(prep / "trainval_images.npy", np.ascontiguousarray(images[:, :16, :16]))
    else:
        labels = np.load(prep / "trainval_labels.npy")
        np.save(prep / "trainval_labels.npy", labels[: len(labels) - 60])
    out = tmp_path / "run"
    status = train_mod.main(["--prepared", str(prep), "--out", str(out), "--width", "4", "--epochs", "1",
                             "--batch-size", "16", "--threads", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("cifar10-hvd train: ") and str(prep) in err, err
    assert not out.exists()


def test_cli_wiring_in_a_subprocess(tmp_path):
    # the one subprocess: the console script's exit status and stderr prefix
    cfg = write(tmp_path / "bad.yaml", "prepare: {valid_ratio: 2}\n")
    proc = run_cli(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert proc.returncode == 2 and proc.stderr.startswith("cifar10-hvd run: ") and str(cfg) in proc.stderr, proc.stderr
    assert "key 'valid_ratio' must be < 1.0" in proc.stderr


def test_run_record_is_versioned_and_read_through_the_schema(tmp_path):
    from trainer.config import RunRecord, TrainConfig, read_run_record

    rec = RunRecord(train=TrainConfig(width=8, eval_crop=36), classes=["a", "b"], phase="final", world_size=2,
                    global_batch=256, lr=0.2, versions={"mxnet": "1.9.1"})
    (tmp_path / "config.json").write_text(rec.to_json())
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == 1
    assert read_run_record(tmp_path) == rec
    # a record from before format_version (the trainer's files so far) reads as version 1, defaults filled in
    (tmp_path / "config.json").write_text(json.dumps({"train": {"width": 4}, "classes": ["a", "b"]}))
    assert read_run_record(tmp_path).train == TrainConfig(width=4)
    for bad, expect in [({"format_version": 2}, "key 'format_version' must be one of 1"),
                        ({"train": {"width": "wide"}}, "(train): key 'width' must be an integer"),
                        ({"classes": []}, "key 'classes' must be a non-empty list"),
                        ({"world_size": 0}, "key 'world_size' must be >= 1")]:
        (tmp_path / "config.json").write_text(json.dumps({"train": {}, "classes": ["a", "b"], **bad}))
        with pytest.raises(ValueError, match=re.escape(expect)) as info:
            read_run_record(tmp_path)
        assert str(tmp_path / "config.json") in str(info.value)
