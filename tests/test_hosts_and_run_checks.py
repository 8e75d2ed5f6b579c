"""What `cifar10-hvd run` checks before it writes or trains: every host it may reach (a host name or address
with optional slots, never an ssh option), the prepared arrays' bytes, and bad input inside a horovodrun
stage, which must come back as exit 2 like the stage's own command gives."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, ROOT, run_cli, tool_env

from launcher.run import HostUnreachable, check_hosts
from launcher.run_config import parse_host, parse_hostfile

TINY = ["train.width=4", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=128", "train.threads=1",
        "launch.np=1"]
INJECTION = "-oProxyCommand=touch pwned:1"  # an ssh option: ProxyCommand runs `touch pwned` in ssh's cwd


def run_in(cwd: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`cifar10-hvd ARGS` with cwd as the working directory (where an injected `touch pwned` would land)."""
    return subprocess.run([str(BIN / "cifar10-hvd"), *args], capture_output=True, text=True, timeout=timeout,
                          env=tool_env(), cwd=cwd)


def hostile_entry_points(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each way a host enters a run: (extra run arguments, what the message must name)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# workers\n\nnode-a slots=1\n-oProxyCommand=touch$IFS./pwned slots=1\n")
    config = tmp_path / "shared.yaml"
    config.write_text(f"launch:\n  np: 2\n  hosts: '{INJECTION}'\n")
    return {
        "flag": (["--config", str(ROOT / "configs" / "demo.yaml"), "--hosts", INJECTION], INJECTION),
        "hostfile": (["--config", str(ROOT / "configs" / "demo.yaml"), "--hostfile", str(hostfile)],
                     f"{hostfile} line 4"),
        "config": (["--config", str(config)], INJECTION),
        "override": (["--config", str(ROOT / "configs" / "demo.yaml"), f"launch.hosts={INJECTION}"], INJECTION),
    }


@pytest.mark.parametrize("entry", ["flag", "hostfile", "config", "override"])
def test_a_host_that_is_an_ssh_option_is_refused_before_anything_runs_or_is_written(demo_src, tmp_path, entry):
    args, named = hostile_entry_points(tmp_path)[entry]
    before = set(tmp_path.iterdir())
    proc = run_in(tmp_path, ["run", *args, "--data", str(demo_src), "--workdir", str(tmp_path / "work")])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "-oProxyCommand=touch" in proc.stderr
    assert set(tmp_path.iterdir()) == before  # no pwned file, no workdir
    assert not list(ROOT.glob("pwned*"))


@pytest.mark.parametrize("hosts, named", [("localhost:x", "localhost:x"), ("localhost:0", "localhost:0"),
                                          ("node-a:1,,node-b:1", "empty"), ("node_a:1", "node_a:1"),
                                          ("a..b:1", "a..b:1"), ("-node:1", "-node:1"), ("node-:1", "node-:1"),
                                          ("fe80::1%eth0", "fe80::1%eth0"), ("[node-a]:1", "[node-a]:1")])
def test_a_malformed_hosts_list_is_exit_2_naming_the_entry_before_prepare(demo_src, tmp_path, hosts, named):
    work = tmp_path / "work"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
                    "--workdir", str(work), f"--hosts={hosts}"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--hosts" in proc.stderr and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not work.exists()


def test_more_ranks_than_the_hosts_slots_is_exit_2_before_prepare(demo_src, tmp_path):
    work = tmp_path / "work"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(demo_src),
                    "--workdir", str(work), "--np", "3", "--hosts", "localhost:2"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "3 ranks" in proc.stderr and "2 slots" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not work.exists()


def test_host_names_addresses_and_slots_are_taken_as_written():
    assert parse_host("node-a") == ("node-a", None)
    assert parse_host("Node-1.example.com.:4") == ("Node-1.example.com.", 4)
    assert parse_host("10.0.0.7:2") == ("10.0.0.7", 2)
    assert parse_host("fe80::1") == ("fe80::1", None)
    assert parse_host("[fe80::1]:8") == ("fe80::1", 8)
    for bad in ("", "-oX", "a b", "a;b", "$(id)", "a:1:2", "a:-1", "x" * 64, "[10.0.0.7]:1", "a:99999999"):
        with pytest.raises(ValueError):
            parse_host(bad)


def test_hostfiles_in_the_forms_horovodrun_and_open_mpi_read(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the workers\n\nnode-a slots=2\nnode-b:3  # trailing comment\n  node-c\n"
                        "10.0.0.9 slots = 1\n")
    assert parse_hostfile(hostfile) == [("node-a", 2), ("node-b", 3), ("node-c", None), ("10.0.0.9", 1)]
    for line, why in [("node-a slots=0", "slots"), ("node-a slots=2 extra", "extra"), ("node-a cpus=2", "cpus")]:
        hostfile.write_text(f"node-z\n{line}\n")
        with pytest.raises(ValueError, match=f"{hostfile} line 2: .*{why}"):
            parse_hostfile(hostfile)
    hostfile.write_text("# nobody\n")
    with pytest.raises(ValueError, match="no hosts"):
        parse_hostfile(hostfile)


def test_a_hostfile_with_comments_and_bare_names_starts_the_job(prepared, tmp_path):
    """horovodrun's own hostfile reader breaks on comments, blank lines and `host:N`: run hands it -H."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine\n\nlocalhost:1\n")
    work = tmp_path / "work"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", str(prepared),
                    "--workdir", str(work), "--phases", "tune", "--hostfile", str(hostfile), *TINY], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-H localhost:1 --gloo" in proc.stdout
    assert (work / "tune" / "model-final.params").is_file()


def test_the_ssh_probe_takes_the_host_as_a_host_even_when_it_looks_like_an_option(tmp_path):
    """check_hosts is the project's own ssh call: `--` ends ssh's options, whatever reached it."""
    pwned = tmp_path / "pwned"
    with pytest.raises(HostUnreachable, match="ProxyCommand"):
        check_hosts([f"-oProxyCommand=touch {pwned}"], timeout=30)
    assert not pwned.exists()


def copy_prepared(prepared: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    return copy


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def change_label(path: Path) -> None:
    labels = np.load(path)
    labels[-1] = (labels[-1] + 1) % 10  # still a class: only the hash can tell
    np.save(path, labels)


@pytest.mark.parametrize("damage", ["image byte", "label"])
def test_run_refuses_prepared_arrays_whose_bytes_changed(prepared, tmp_path, damage):
    prep = copy_prepared(prepared, tmp_path)
    manifest = json.loads((prep / "manifest.json").read_text())
    entry = manifest["splits"]["train"]
    name = entry["images"] if damage == "image byte" else entry["labels"]
    if damage == "image byte":
        flip_byte(prep / name, (prep / name).stat().st_size - 100)
    else:
        change_label(prep / name)
    work = tmp_path / "work"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", str(prep),
                    "--workdir", str(work), "--phases", "tune", *TINY], timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert name in proc.stderr and "sha256" in proc.stderr, proc.stderr
    assert "epoch 1/" not in proc.stdout + proc.stderr
    assert not (work / "tune" / "model-final.params").exists()


def test_bad_input_inside_a_horovodrun_stage_is_exit_2_through_run(demo_src, tmp_path):
    """valid_ratio 0.99 leaves fewer training images than a batch: train says so (exit 2); so must run."""
    config = tmp_path / "tiny-train.yaml"
    config.write_text("prepare:\n  valid_ratio: 0.99\n")
    proc = run_cli(["run", "--config", str(config), "--data", str(demo_src), "--workdir", str(tmp_path / "work"),
                    "--phases", "prepare,tune", *TINY], timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cifar10-hvd train:" in proc.stderr and "fewer than one global batch" in proc.stderr, proc.stderr
    assert "stage 'tune' failed (exit status 2)" in proc.stderr


def test_np_below_the_hosts_slots_starts_np_ranks_under_gloo(prepared, tmp_path):
    """horovodrun --gloo starts a rank on every slot -H lists, whatever -np says: run lists exactly np slots."""
    work = tmp_path / "work"
    proc = run_cli(["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--prepared", str(prepared),
                    "--workdir", str(work), "--phases", "tune", "--np", "1", "--hosts", "localhost:2",
                    "--controller", "gloo", *TINY], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((work / "tune" / "config.json").read_text())["world_size"] == 1
