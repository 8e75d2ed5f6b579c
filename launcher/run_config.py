"""The run config: one YAML file (configs/*.yaml) that drives every stage, locally or on a cluster.

Top-level keys: version, data, prepared, workdir, phases, and the sections prepare,
train, predict, launch. Each section is the class of the stage that owns it:
data_prep.config.PrepareConfig, trainer.config.TrainConfig and PredictConfig, and
LaunchConfig here; every value goes through contracts.schema's validators, the same
ones the stages' own flags use. The resolved run-config.yaml is a versioned RunConfig
record, read back with load_run_config.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contracts.files import atomic_write_text, read_bounded
from contracts.schema import (
    RUN_CONFIG_KEYS,
    RUN_CONFIG_SCALARS,
    RUN_CONFIG_SECTIONS,
    InputError,
    StrictDumper,
    from_mapping,
    parse_yaml,
    read_yaml,
)
from data_prep.config import PrepareConfig
from predictor.config import PredictConfig
from trainer.config import TrainConfig

PHASES = ("prepare", "tune", "final", "predict")
RUN_CONFIG_VERSION = 1  # the `version:` of run-config.yaml; a config file may leave it out


# Hosts come from configs and hostfiles written by others and end up on ssh command lines: each is a host name
# (RFC 1123: dot-separated labels of letters, digits and '-', none starting or ending with '-') or an IP
# address, never anything ssh could take for an option.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_SLOTS = re.compile(r"[1-9][0-9]{0,5}")
HOST_FORM = ("a host name (letters, digits and '-' in dot-separated labels, none starting or ending with '-') or "
             "an IP address, with an optional :SLOTS, a positive integer ([ADDRESS]:SLOTS for IPv6)")
HOSTFILE_MAX_BYTES = 1 << 20


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address) and "%" not in text
    except ValueError:
        return False


def parse_host(entry: str) -> tuple[str, int | None]:
    """HOST, HOST:SLOTS, an IPv6 address or [IPV6]:SLOTS -> (host, slots or None); ValueError naming ENTRY."""
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", entry)
    if bracketed:
        host, slots, ok = bracketed[1], bracketed[2], _is_ipv6(bracketed[1])
    elif entry.count(":") > 1:
        host, slots, ok = entry, None, _is_ipv6(entry)
    else:
        host, sep, slots = entry.partition(":")
        slots = slots if sep else None
        ok = len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None
    if not ok or (slots is not None and not _SLOTS.fullmatch(slots)):
        raise ValueError(f"{entry!r} is not {HOST_FORM}")
    return host, None if slots is None else int(slots)


def parse_hosts(value: str) -> list[tuple[str, int | None]]:
    """A -H list ('node1:4,node2:4'; '' for none) -> [(host, slots or None)]; ValueError naming the bad entry."""
    if not value.strip():
        return []
    entries = [e.strip() for e in value.split(",")]
    if "" in entries:
        raise ValueError(f"{value!r} has an empty entry (hosts are separated by single commas)")
    return [parse_host(e) for e in entries]


def _read_hostfile(path: Path) -> str:
    """PATH's text: a regular file of at most HOSTFILE_MAX_BYTES."""
    try:
        data = read_bounded(path, HOSTFILE_MAX_BYTES, "hostfile")
    except OSError as e:
        raise InputError(f"hostfile {path}: {e.strerror}") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InputError(f"hostfile {path}: not UTF-8 text") from None


def _hostfile_entry(text: str) -> tuple[str, int | None]:
    """One hostfile line without its comment: `HOST`, `HOST:SLOTS` or `HOST slots=SLOTS`."""
    match = re.fullmatch(r"(\S+)(?:\s+slots\s*=\s*(\S+))?", text)
    if not match:
        raise ValueError(f"expected HOST, HOST:SLOTS or HOST slots=SLOTS, where HOST is {HOST_FORM}")
    host, slots = parse_host(match[1])
    if match[2] is None:
        return host, slots
    if slots is not None or not _SLOTS.fullmatch(match[2]):
        raise ValueError("expected HOST slots=SLOTS, SLOTS a positive integer (and no :SLOTS after HOST)")
    return host, int(match[2])


def parse_hostfile(path: str | Path) -> list[tuple[str, int | None]]:
    """The hosts of a hostfile as Open MPI and horovodrun write it: one `HOST`, `HOST:SLOTS` or `HOST slots=SLOTS`
    a line, '#' comments and blank lines; InputError naming the file and line of anything else."""
    hosts = []
    for number, line in enumerate(_read_hostfile(Path(path)).splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            hosts.append(_hostfile_entry(text))
        except ValueError as e:
            raise InputError(f"hostfile {path} line {number}: {line.strip()!r}: {e}") from None
    if not hosts:
        raise InputError(f"hostfile {path}: lists no hosts")
    return hosts


@dataclass
class LaunchConfig:
    """How training and predict are started: horovodrun -np N -H hosts --controller."""

    np: int = field(default=1, metadata={"help": "number of ranks (horovodrun -np)", "min": 1})
    hosts: str = field(default="", metadata={"help": "horovodrun -H list, e.g. node1:4,node2:4 (default localhost:NP)",
                                             "check": parse_hosts})
    hostfile: str = field(default="", metadata={"help": "horovodrun --hostfile (e.g. the MPI Operator's /etc/mpi/hostfile)"})
    controller: str = field(default="gloo", metadata={"help": "Horovod controller", "choices": ("gloo", "mpi")})
    # recovery (launcher/restart.py): a stage that lost a host or rank is relaunched with --resume
    max_restarts: int = field(default=0, metadata={
        "help": "relaunch a training or predict stage that lost a host or rank (watchdog fault, host not answering "
                "ssh) up to this many times in the run, with --resume, on the hosts that answer (0 = never)", "min": 0})
    min_np: int = field(default=1, metadata={
        "help": "fewest ranks a restart may continue with (the per-rank batch grows to global batch / ranks); "
                "below it the lost host gets 60 s to answer again", "min": 1})


PrepareSection, LaunchSection = PrepareConfig, LaunchConfig  # kept importable for scripts that use these names


@dataclass
class RunConfig:
    """Everything `cifar10-hvd run` needs; built by load_run_config, written as run-config.yaml."""

    version: int = RUN_CONFIG_VERSION
    data: str = ""
    prepared: str = ""
    workdir: str = "runs/default"
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str = "defaults"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the shape of the YAML file."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_SECTIONS = dict(zip(RUN_CONFIG_SECTIONS, (PrepareConfig, TrainConfig, PredictConfig, LaunchConfig), strict=True))
_SCALARS = RUN_CONFIG_SCALARS


def parse_phases(value: Any, source: str) -> list[str]:
    """'prepare,tune' or a YAML list -> validated phase names in pipeline order."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise InputError(f"{source}: key 'phases' must be a list of {', '.join(PHASES)}")
    names = [str(p).strip() for p in items]
    bad = [p for p in names if p not in PHASES]
    if bad:
        raise InputError(f"{source}: key 'phases' has unknown phase(s) {', '.join(bad)} (known: {', '.join(PHASES)})")
    return [p for p in PHASES if p in names]


def from_dict(data: dict, source: str) -> RunConfig:
    """Validate a parsed YAML mapping into a RunConfig; errors name the key and source."""
    cfg = RunConfig(source=source)
    for key, value in data.items():
        if key in _SECTIONS:
            if value is None:
                continue
            base = getattr(cfg, key)
            setattr(cfg, key, from_mapping(_SECTIONS[key], value, f"{source} ({key})", base))
        elif key in _SCALARS:
            if value is None:
                continue
            if not isinstance(value, str):
                raise InputError(f"{source}: key '{key}' must be a string path, got {value!r}")
            setattr(cfg, key, value)
        elif key == "phases":
            cfg.phases = parse_phases(value, source)
        elif key == "version":
            if type(value) is not int or value != RUN_CONFIG_VERSION:
                raise InputError(f"{source}: key 'version' is {value!r}; this code reads run configs of version "
                                  f"{RUN_CONFIG_VERSION}")
        else:
            known = ", ".join(RUN_CONFIG_KEYS)
            raise InputError(f"{source}: unknown key '{key}' (known keys: {known})")
    return cfg


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config YAML and apply `key=value` overrides (dotted `train.epochs=3` or unique `epochs=3`)."""
    data = read_yaml(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override '{item}': expected key=value, e.g. train.epochs=3")
        value = parse_yaml(raw, f"override '{item}'") if raw else ""
        section, dot, name = key.partition(".")
        if not dot:
            name = key
            owners = [s for s, cls in _SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
            if key in (*_SCALARS, "phases"):
                from_dict({key: value}, f"override '{item}'")  # an error names the override, not the file
                data[key] = value
                continue
            if len(owners) != 1:
                where = f"is in sections {', '.join(owners)}; write e.g. {owners[0]}.{name}=..." if owners else "is not a known key"
                raise InputError(f"override '{item}': '{name}' {where}")
            section = owners[0]
        if section not in _SECTIONS:
            raise InputError(f"override '{item}': unknown section '{section}' (known: {', '.join(_SECTIONS)})")
        sub = data.get(section) or {}
        if not isinstance(sub, dict):
            raise InputError(f"{path}: section '{section}' must be a mapping")
        from_mapping(_SECTIONS[section], {name: value}, f"override '{item}'")  # an error names the override
        data[section] = {**sub, name: value}
    return from_dict(data, str(path))


def write_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the stages actually read), atomically."""
    atomic_write_text(Path(path), yaml.dump(cfg.to_dict(), Dumper=StrictDumper, sort_keys=False))
