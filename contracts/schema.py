"""The configuration machinery every stage shares: YAML reading, field validation, argparse flags.

Each stage owns one dataclass for its section of a run config (data_prep.config.PrepareConfig,
trainer.config.TrainConfig and PredictConfig, launcher.run_config.LaunchConfig). A field's
metadata holds its help text and its one validator ("min", "min_excl", "max_excl", "choices",
"pattern": a regular expression a str value must match whole, described by "pattern_help", or
"check": a function that raises ValueError naming what is wrong, or "check_named": a function of the
value and its source that raises its own InputError, for a check other callers share). "aliases" maps
an old spelling of a choice to its name ({"seed": "d2l"}): check_value returns the name, so a config
object holds only names, and an old spelling keeps working wherever a value is read;
the same check_value runs for a YAML key, a run override and a command-line flag, so a value
accepted by one entry point is accepted by all, and rejected with the same message naming the
key and the file. Precedence: defaults < YAML file < flags. It lives here, in the lowest package.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from contracts.errors import InputError
from contracts.files import read_bounded

# the top-level keys of a run config (launcher.run_config); a YAML file with any of them is one
RUN_CONFIG_SCALARS = ("data", "prepared", "workdir")
RUN_CONFIG_SECTIONS = ("prepare", "train", "predict", "launch")
RUN_CONFIG_KEYS = ("version", *RUN_CONFIG_SCALARS, "phases", *RUN_CONFIG_SECTIONS)

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; a hostile one (/dev/zero) must not fill the memory
MAX_YAML_DEPTH = 32  # nesting levels of a config; deeper ones are refused before Python's recursion limit


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise InputError (exit 2 by the convention) instead of SystemExit,
    so a bad flag on the in-process path (launcher.cli.main) comes back as a status, not an exception."""

    def error(self, message: str) -> typing.NoReturn:
        raise InputError(f"{message} (see {self.prog} --help)")


def _check_type(typ: Any, name: str, value: Any, source: str) -> Any:
    """value as the field's type (an int is a valid float), or InputError naming name and source."""
    if typ is bool and not isinstance(value, bool):
        raise InputError(f"{source}: key '{name}' must be true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{source}: key '{name}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{source}: key '{name}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{source}: key '{name}' must be a finite number (from -{sys.float_info.max:.1e} to "
                              f"{sys.float_info.max:.1e}), got {value!r}")
        return float(value)
    if typ is str and not isinstance(value, str):
        raise InputError(f"{source}: key '{name}' must be a string, got {value!r}")
    return value


def check_value(cls: type, name: str, value: Any, source: str) -> Any:
    """Return value coerced to the field's type, or raise InputError naming name and source."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise InputError(f"{source}: unknown key '{name}' (known keys: {', '.join(sorted(fields))})")
    meta = fields[name].metadata
    value = _check_type(typing.get_type_hints(cls)[name], name, value, source)
    if "aliases" in meta:  # an old spelling of a choice becomes its name (an aliased field's value is a str here)
        value = meta["aliases"].get(value, value)
    if "choices" in meta and value not in meta["choices"]:
        raise InputError(f"{source}: key '{name}' must be {choices_text(meta)}, got {value!r}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise InputError(f"{source}: key '{name}' must be {meta['pattern_help']}, got {value!r}")
    if "check" in meta:  # a function that raises ValueError saying what is wrong (a list's bad entry)
        try:
            meta["check"](value)
        except ValueError as e:
            raise InputError(f"{source}: key '{name}': {e}") from None
    if "check_named" in meta:  # a function(value, source) raising an InputError of its own that names source
        meta["check_named"](value, source)
    if "min" in meta and value < meta["min"]:
        raise InputError(f"{source}: key '{name}' must be >= {meta['min']}, got {value!r}")
    if "min_excl" in meta and value <= meta["min_excl"]:
        raise InputError(f"{source}: key '{name}' must be > {meta['min_excl']}, got {value!r}")
    if "max_excl" in meta and value >= meta["max_excl"]:
        raise InputError(f"{source}: key '{name}' must be < {meta['max_excl']}, got {value!r}")
    return value


def choices_text(meta: Mapping[str, Any]) -> str:
    """'one of batched, d2l (seed: an alias of d2l)': a field's choices and the aliases it accepts."""
    aliases = "; ".join(f"{old}: an alias of {new}" for old, new in meta.get("aliases", {}).items())
    return f"one of {', '.join(map(str, meta['choices']))}" + (f" ({aliases})" if aliases else "")


def apply_aliases(obj: Any) -> None:
    """Replace each aliased value in the dataclass obj by its name: for objects built in code, not by check_value."""
    for f in dataclasses.fields(obj):
        aliases = f.metadata.get("aliases", {})
        value = getattr(obj, f.name)
        if isinstance(value, str) and value in aliases:
            setattr(obj, f.name, aliases[value])


def alias_spelled(obj: Any) -> dict[str, Any]:
    """The dataclass obj's fields as a dict, each value that has an alias written as that alias (its spelling
    before it was renamed) and each key marked added_later left out while at its default, so that a digest
    of it recorded then (a stage key) equals one computed now."""
    spelled = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("added_later") and spelled[f.name] == f.default:
            del spelled[f.name]  # a key newer than the digests: at its default it changes nothing they cover
            continue
        old = {new: alias for alias, new in f.metadata.get("aliases", {}).items()}
        if isinstance(spelled[f.name], str) and spelled[f.name] in old:
            spelled[f.name] = old[spelled[f.name]]
    return spelled


def from_mapping(cls: type, mapping: Mapping[str, Any], source: str, base: Any = None) -> Any:
    """Build (or update a copy of base) a config dataclass from a mapping, validating every key."""
    if not isinstance(mapping, Mapping):
        raise InputError(f"{source}: expected a mapping of keys to values, got {type(mapping).__name__}")
    obj = dataclasses.replace(base) if base is not None else cls()
    for key, value in mapping.items():
        setattr(obj, str(key), check_value(cls, str(key), value, source))
    return obj


class _Refused(yaml.YAMLError):
    """YAML that parses but would mean two things or blow up; line is 1-based."""

    def __init__(self, mark: yaml.Mark, what: str):
        super().__init__(what)
        self.line, self.what = mark.line + 1, what


class StrictLoader(yaml.SafeLoader):
    """safe_load's loader, refusing what a config must not do: a key twice in one mapping (the last would
    silently win, a second `train:` replacing the first whole), aliases (a few lines of them expand to
    gigabytes), nesting deeper than MAX_YAML_DEPTH; and reading 1e-3 as the number it looks like."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(event.start_mark, f"alias *{event.anchor}: YAML aliases are not allowed in a config")
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_YAML_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a collection as a key: construction refuses it
            key = self.construct_object(key_node)
            if key in first_line:
                raise _Refused(key_node.start_mark, f"duplicate key {str(key)!r} (first on line {first_line[key]})")
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class StrictDumper(yaml.SafeDumper):
    """safe_dump's dumper, quoting the strings StrictLoader would read as numbers (a folder named 1e5)."""


# YAML 1.1 reads 1e-3 and 1e308 as strings (its floats need a dot and a signed exponent); a config means numbers
for _cls in (StrictLoader, StrictDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """The YAML text loaded by StrictLoader; a syntax error, a tag (!!python/...), a duplicate key, an alias or
    deep nesting is a InputError naming source (and the line)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no tags that build Python objects
    except _Refused as e:
        raise InputError(f"{source}:{e.line}: {e.what}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise InputError(f"{source}: not valid YAML: nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    """Load a YAML file (a regular file of at most MAX_CONFIG_BYTES) with parse_yaml; an empty file is an empty mapping."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, "config").decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read config: {getattr(e, 'strerror', None) or e}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def section(data: dict, name: str, path: str | Path) -> dict:
    """The keys of section `name` in a YAML document: its `name:` mapping in a run config, else the whole mapping."""
    if not any(k in data for k in RUN_CONFIG_KEYS):
        return data
    sub = data.get(name) or {}
    if not isinstance(sub, dict):
        raise InputError(f"{path}: section '{name}' must be a mapping")
    return sub


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add a --flag-name for every field of cls; defaults are None so only given flags override.

    Values stay strings here: given_flags converts them and check_value judges them, so a flag is
    rejected with the same message as the YAML key (argparse's own type and choice errors would differ).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        one_of = f"; {choices_text(f.metadata)}" if "choices" in f.metadata else ""
        helptext = f"{f.metadata.get('help', '')}{one_of} (default: {f.default!r})"
        dest = prefix.replace("-", "_") + f.name
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=helptext)


def _from_flag(typ: Any, raw: Any) -> Any:
    """A flag's string as the field's type where it parses (int, float); else unchanged for check_value to refuse."""
    if isinstance(raw, str) and typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            return raw
    return raw


def given_flags(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of cls that were given as flags (not None), converted to their types."""
    hints = typing.get_type_hints(cls)
    given = {f.name: getattr(args, prefix.replace("-", "_") + f.name) for f in dataclasses.fields(cls)}
    return {k: _from_flag(hints[k], v) for k, v in given.items() if v is not None}


def apply_flags(cls: type, args: argparse.Namespace, base: Any, prefix: str = "") -> Any:
    """base updated with the flags that were given; an error names the flag (`--epochs: key 'epochs' ...`)."""
    for key, value in given_flags(cls, args, prefix).items():
        base = from_mapping(cls, {key: value}, "--" + prefix + key.replace("_", "-"), base)
    return base


def resolve(cls: type, args: argparse.Namespace, config_path: str | None, section_name: str, prefix: str = "") -> Any:
    """Defaults, then the YAML file's section, then the flags that were given."""
    cfg = cls()
    if config_path:
        data = read_yaml(config_path)
        cfg = from_mapping(cls, section(data, section_name, config_path), f"{config_path} ({section_name})", cfg)
    return apply_flags(cls, args, cfg, prefix)


def to_argv(cfg: Any) -> list[str]:
    """The flags that make add_flags' parser rebuild cfg: --name VALUE per field (--flag/--no-flag for bools)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        flag, value = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
