"""Loading a job spec: YAML plus `--set` overrides, converted into the typed objects with
one-line errors naming the key (unknown key, wrong type, missing file)."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import glob
import itertools
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from bulkinfer.errors import SpecError, did_you_mean, first_line
from bulkinfer.spec.schema import PACKAGE_PREFIX, JobSpec


def load_spec(
    path: str | os.PathLike | None,
    overrides: list[str] = (),
    output: str | None = None,
    data: dict | None = None,
) -> JobSpec:
    """Read a YAML job spec, apply `key.sub=value` overrides, validate, resolve relative paths.

    Paths in the spec are relative to the spec file's folder, as a user reading the file expects.
    """
    if data is None:
        data = _read_yaml(Path(path))
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    from_command_line = {key for item in overrides for key in _apply_override(data, item)}
    if output is not None:
        data.setdefault("output", {})
        if not isinstance(data["output"], dict):
            raise SpecError("output: expected a mapping with a 'path' key")
        data["output"]["path"] = output
        from_command_line.add("output.path")
    _normalise_input_path(data)
    spec = _build(JobSpec, data, "")
    spec = _resolve_paths(spec, base, from_command_line)
    _check_files_exist(spec)
    return spec


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain PyYAML keeps the
    last value silently, so a forgotten earlier line would quietly stop counting."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = lines.get(key)
                    lines[key] = line
                except TypeError:  # an unhashable key: the constructor below names it
                    continue
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key '{key}' on lines {earlier} and {line}",
                        problem_mark=key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML's) reads 1e-3 and 7e-1 as strings, wanting a dot in a float; YAML 1.2 and
# JSON read them as the numbers they are, and so do bulkinfer's specs
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

# YAML 1.1 reads yes, no, on and off as booleans too: in a response_format's schema `enum: [yes,
# no, maybe]` became [true, false, "maybe"] and `NO` (Norway) false, silently. As in YAML 1.2
# and JSON, only true and false are booleans; a boolean setting still takes the other words.
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items()
}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.1 reads 010 as 8 (octal), 1:30 as 90 (base 60) and 2026-01-01 as a date (which no JSON
# schema takes); as in YAML 1.2, an integer is decimal (or 0x.., 0o..) and a date is text
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items()
}
INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F]+|0o[0-7]+)$")
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", INT_12, list("-+0123456789"))
# floats likewise without YAML 1.1's base 60 (1:30.5 was 90.5): the 1.1 forms less that one
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag != "tag:yaml.org,2002:float" or "(?::" not in regexp.pattern  # (base 60)
    ]
    for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items()
}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _int_12(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0x", "0o")):
        return int(text, 16 if text[1] == "x" else 8)
    return int(text, 10)


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _int_12)
YAML_11_WORDS = {"yes": True, "on": True, "no": False, "off": False}
PLAIN_WORD_TAG = "tag:bulkinfer,2026:yaml-1.1-bool"


class PlainWord(str):
    """An unquoted yes, no, on or off: text, as YAML 1.2 reads it (a schema's enum value),
    and still true or false where a setting is true or false, as YAML 1.1 read it. A quoted
    'yes' is plain text everywhere."""

    @property
    def truth(self) -> bool:
        return YAML_11_WORDS[self.lower()]


UniqueKeyLoader.add_implicit_resolver(
    PLAIN_WORD_TAG,
    re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"),
    list("yYnNoO"),
)
UniqueKeyLoader.add_constructor(
    PLAIN_WORD_TAG, lambda loader, node: PlainWord(loader.construct_scalar(node))
)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise SpecError(f"{path} is a folder; give the job's YAML file")
    if not path.is_file():
        raise SpecError(f"{path}: no such job spec file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as exc:  # named as a YAML error is, by line and column
        line = exc.object.count(b"\n", 0, exc.start) + 1
        column = exc.start - exc.object.rfind(b"\n", 0, exc.start)
        raise SpecError(
            f"{path}:{line}:{column}: not valid UTF-8 ({exc.reason}, byte {column} of the line)"
        ) from None
    if data is None:
        raise SpecError(f"{path}: the job spec is empty")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a mapping of sections (model, task, input, ...)")
    return data


def _apply_override(data: dict, item: str) -> list[str]:
    """`--set task.max_new_tokens=64`: the value is parsed as YAML, so lists and numbers work.
    A section given as a mapping (`--set 'task={n: 2}'`) sets its settings one by one, as the
    Python API's keywords do; the section's other settings stay the spec's.

    Returns the dotted keys that were set."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. task.max_new_tokens=64")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        if raw.lstrip()[:1] in ("[", "{", '"', "'"):  # meant as a list, a map or quoted
            problem = getattr(exc, "problem", None) or first_line(exc)
            raise SpecError(
                f"--set {key.strip()}: {raw!r} is not valid YAML ({problem}); "
                "quote the whole value to pass it as text"
            ) from None
        value = raw  # text YAML does not take as it stands (`a: b: c`) is meant as text
    parts = key.strip().split(".")
    takes = _takes(parts)
    value = _as_typed(raw, value, mapping=takes in ("section", "mapping"))
    if value is None and takes == "section":  # (a section left empty in the file is one)
        raise SpecError(f"--set {key.strip()}: a section is set with a map ({parts[0]}={{...}})")
    if len(parts) == 1 and isinstance(value, dict):
        section = data.get(parts[0])
        if not isinstance(section, dict):
            section = data[parts[0]] = {}
        section.update(value)
        return [f"{parts[0]}.{name}" for name in value]
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:  # a section left empty in the file (`task:`)
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
    return [".".join(parts)]


NULL_WORDS = {"~", "null", "Null", "NULL"}


def _as_typed(raw: str, value: Any, mapping: bool) -> Any:
    """A --set value as YAML read it, or the text itself where YAML made of ordinary text
    nothing (`# Be brief`: a comment; `&x`: an anchor), an empty string (`|`, `>`) or, for a
    key that takes no mapping, a mapping (`You are: helpful`). Null is null or ~."""
    text = raw.strip()
    if value is None and text and text not in NULL_WORDS:
        return raw
    if value == "" and text not in ("", '""', "''"):
        return raw
    if isinstance(value, dict) and not text.startswith("{") and not mapping:
        return raw
    return value


def _takes(parts: list[str]) -> str | None:
    """What the spec key takes: "section", "mapping" (a field that takes one), "value", or
    None for a key the spec does not have (refused later, naming it)."""
    hint: Any = JobSpec
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
        if hint is None:
            return None
    if dataclasses.is_dataclass(hint):
        return "section"
    kinds = typing.get_args(hint) or (hint,)
    return "mapping" if any(k is dict or typing.get_origin(k) is dict for k in kinds) else "value"


def _normalise_input_path(data: dict) -> None:
    section = data.get("input")
    if isinstance(section, dict) and isinstance(section.get("path"), str):
        section["path"] = [section["path"]]


def _build(cls: type, data: Any, key: str) -> Any:
    """Turn a mapping into the dataclass `cls`, checking keys and types field by field."""
    label = key or "the job spec"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        shape = ""
        if key and "path" in fields and isinstance(data, str):  # `output: out/x`
            shape = f"; a path goes under its key: {key}: {{path: {data}}}"
        raise SpecError(f"{label}: expected a mapping, got {_kind(data)}{shape}")
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            known = {f"{key}.{f}" if key else f for f in fields}
            hint = _in_other_sections(str(name), where) or did_you_mean(where, known)
            if not hint and not key:  # a section of no name near any
                hint = f" (the top-level keys: {', '.join(fields)})"
            raise SpecError(f"unknown key '{where}'{hint}")
    values = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"missing key '{where}'{_required_inside(hints[name], where)}")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _required_inside(hint, where: str) -> str:
    """' (output: {path: ...}, or --output DIR)' for a missing section: what it must hold."""
    if not dataclasses.is_dataclass(hint):
        return ""
    needed = [
        f.name
        for f in dataclasses.fields(hint)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if not needed:
        return ""
    text = f" ({where}: {{{', '.join(f'{n}: ...' for n in needed)}}}"
    return text + (", or --output DIR)" if where == "output" else ")")


def _in_other_sections(name: str, where: str) -> str:
    """' (did you mean 'task.max_new_tokens'?)' for a key given outside its section (a bare
    `max_new_tokens`, or `task.device`): the spec's keys of that name elsewhere, else a bare
    key's close match among every section's keys (`tempreature`)."""
    paths = list(_key_paths(JobSpec, ""))
    found = [path for path in paths if path.rsplit(".", 1)[-1] == name and path != where]
    if not found:
        if "." in where:
            return ""
        by_name = {path.rsplit(".", 1)[-1]: path for path in paths if "." in path}
        close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
        return f" (did you mean '{by_name[close[0]]}'?)" if close else ""
    return " (did you mean " + " or ".join(f"'{path}'" for path in found) + "?)"


def _key_paths(cls: type, prefix: str) -> Iterator[str]:
    """Every key of the spec dataclass `cls`, dotted, sections' keys included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        yield path
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _key_paths(hints[f.name], path)


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key)  # `task:` left empty
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # keywords ('auto') last: "expected a whole number or 'auto'"
        alternatives = sorted(
            (a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is Literal
        )
        for arg in alternatives:
            try:
                return _convert(value, arg, key)
            except SpecError:
                if arg is int and isinstance(value, int) and not isinstance(value, bool):
                    raise  # a whole number out of range: that, not "expected a number or 'auto'"
        keywords = [
            str(k)
            for a in alternatives
            if typing.get_origin(a) is Literal
            for k in typing.get_args(a)
        ]
        hint = did_you_mean(value, keywords) if isinstance(value, str) else ""
        wanted = " or ".join(_describe(a) for a in alternatives)
        raise SpecError(f"{key}: expected {wanted}, got {_kind(value)}{hint}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            hint_text = did_you_mean(str(value), [str(a) for a in args])
            raise SpecError(f"{key}: {value!r} is not one of {choices}{hint_text}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            one = f"{_describe(args[0])} or " if args[0] is str else ""
            raise SpecError(f"{key}: expected {one}a list, got {_kind(value)}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, PlainWord):
            return value.truth
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{key}: expected a whole number, got {_kind(value)}")
        if not -(2**63) <= value < 2**63:
            raise SpecError(f"{key}: {value} does not fit in a 64-bit integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{key}: expected a number, got {_kind(value)}")
        if isinstance(value, int) and abs(value) > 1e300 or not math.isfinite(value):
            raise SpecError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{key}: expected a mapping, got {_kind(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{key}: expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"unsupported spec type {hint!r} for {key}")


def _describe(hint: Any) -> str:
    """What a value of this type is, in the words of the error messages."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    names.update({dict: "a mapping", list: "a list"})
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


# `${anything}`, or `$NAME` in an environment variable's usual capitals
VARIABLE = re.compile(r"\$(?:\{([^}]*)\}|([A-Z_][A-Z0-9_]*)(?![A-Za-z0-9_]))")


def _unset_variable(path: str) -> str | None:
    """What is wrong with a variable the path names, as written: one not set, or a shell form
    (`${SCRATCH:-/tmp}`) that is not expanded; None if there is none (`$` in a lowercase name,
    `d$ata`, is the name's own)."""
    for match in VARIABLE.finditer(path):
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            return f"holds {match.group(0)}, a shell form that is not expanded: give a path"
        if name not in os.environ:
            return f"names the environment variable {name}, which is not set"
    return None


def _resolve_paths(spec: JobSpec, base: Path, from_command_line: set[str]) -> JobSpec:
    """Relative paths written in the spec are relative to the spec file's folder; paths given on
    the command line (--set, --output) are relative to the current directory, as a shell user
    expects."""

    def resolve(p: str, key: str) -> str:
        expanded = os.path.expanduser(os.path.expandvars(p))
        unset = _unset_variable(p)
        if unset and not (os.path.exists(expanded) or glob.glob(expanded, recursive=True)):
            raise SpecError(f"{key}: {p} {unset}")  # (expandvars leaves it: a folder `${X}`)
        if os.path.isabs(expanded):
            return os.path.normpath(expanded)
        given = key in from_command_line or key.split(".")[0] in from_command_line  # (its section)
        root = Path.cwd() if given else base
        return os.path.normpath(root / expanded)

    model_path = spec.model.path
    if not model_path.startswith(PACKAGE_PREFIX):
        model_path = resolve(model_path, "model.path")
    return dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, path=model_path),
        input=dataclasses.replace(
            spec.input, path=[resolve(p, "input.path") for p in spec.input.path]
        ),
        output=dataclasses.replace(spec.output, path=resolve(spec.output.path, "output.path")),
    )


def _check_files_exist(spec: JobSpec) -> None:
    for key, path in [("model.path", spec.model.path), ("output.path", spec.output.path)]:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system gave Python as surrogates
            raise SpecError(
                f"{key}: {path.encode('utf-8', 'backslashreplace').decode()} is not valid UTF-8, "
                "which the libraries that read and write its files need; rename it"
            ) from None
    if not spec.model.path.startswith(PACKAGE_PREFIX) and not os.path.exists(spec.model.path):
        why = _unreadable(spec.model.path) or "does not exist" + _near_path(spec.model.path)
        raise SpecError(f"model.path: {spec.model.path} {why}")
    for p in spec.input.path:
        if not (os.path.exists(p) or glob.glob(p, recursive=True)):
            why = _unreadable(p) or "matches no file" + _near_path(p)
            raise SpecError(f"input.path: {p} {why}")


def _near_path(path: str) -> str:
    """' (did you mean '/data/prompts.jsonl'?)' where the first missing part of `path` is a
    near miss of a name in the folder above it (a typo); '' for a glob or no near name."""
    if glob.has_magic(path):
        return ""
    parts = Path(path).parts
    for depth in range(len(parts) - 1, 0, -1):
        folder = Path(*parts[:depth])
        if not folder.is_dir():
            continue
        try:
            names = [entry.name for entry in itertools.islice(os.scandir(folder), 10_000)]
        except OSError:
            return ""
        close = difflib.get_close_matches(parts[depth], names, n=1, cutoff=0.75)
        if not close:
            return ""
        return f" (did you mean '{Path(folder, close[0], *parts[depth + 1 :])}'?)"
    return ""


def _unreadable(path: str) -> str | None:
    """Why a path that does not exist to os.path.exists cannot be looked at, where it is
    not simply missing: a name too long for the file system, a folder that may not be read."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and exc.strerror:
            return f"cannot be read: {exc.strerror.lower()}"
    except ValueError:  # a NUL character in the name
        return "cannot be a file name (it holds a NUL character)"
    return None
