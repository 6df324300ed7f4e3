"""The job spec: typed, validated config objects loaded from YAML plus `--set` overrides.

Every mistake a user can make in a spec (unknown key, wrong type, impossible value, missing file)
is reported as one line naming the key, so a job fails in a second rather than at row 40,000.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from bulkinfer.errors import SpecError, did_you_mean

Auto = Literal["auto"]


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and where to run them."""

    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_context: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str | None = None
    # auto: the fast engine (packed scoring, continuous-batching decode) on a CUDA GPU where the
    # model supports it, the reference engine otherwise; fast or reference to force one.
    engine: Literal["auto", "fast", "reference"] = "auto"

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give a model folder, a .gguf file or package:NAME/FILE")
        ok_device = self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        if not ok_device:
            raise SpecError(
                f"{key}.device: '{self.device}' is not one of auto, cpu, cuda, cuda:N, mps"
            )
        _at_least(self.max_context, 2, f"{key}.max_context")


# Task keys that only mean something for some task types; a key set away from its default on
# another type is a mistake worth a one-line error (`pooling` on a generate job, `temperature` on
# an embed job). Keys of other features apply to every type.
GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs")
TASK_ONLY_KEYS = {
    "classify": ("all_labels", "multi_label", "threshold", "truncate"),
    "embed": ("pooling", "normalize", "truncate"),
}


@dataclass(frozen=True)
class TaskSpec:
    """What to compute per row."""

    type: Literal["generate", "score", "classify", "embed"] = "generate"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    chat_template: Literal["auto", "always", "never"] = "auto"
    system_prompt: str | None = None
    # classify: every label's probability in `probabilities`; multi-label (sigmoid) models,
    # detected from the model config unless set, list the labels at or above `threshold`.
    all_labels: bool = False
    multi_label: Auto | bool = "auto"
    threshold: float = 0.5
    # embed: auto takes pooling and normalisation from the model's sentence-transformers files.
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    normalize: Auto | bool = "auto"
    # classify, embed: rows longer than the model takes are cut (and counted in
    # `truncated_tokens`) instead of getting a row error.
    truncate: bool = False

    def validate(self, key: str) -> None:
        _at_least(self.max_new_tokens, 1, f"{key}.max_new_tokens")
        _at_least(self.temperature, 0.0, f"{key}.temperature")
        _at_least(self.top_k, 0, f"{key}.top_k")
        _at_least(self.n, 1, f"{key}.n")
        if not 0.0 < self.top_p <= 1.0:
            raise SpecError(f"{key}.top_p: {self.top_p} must be in (0, 1]")
        if any(s == "" for s in self.stop):
            raise SpecError(f"{key}.stop: stop strings must not be empty")
        if not 0.0 < self.threshold < 1.0:
            raise SpecError(f"{key}.threshold: {self.threshold} must be between 0 and 1")
        self._check_keys_fit_type(key)

    def _check_keys_fit_type(self, key: str) -> None:
        """A key of another task type, set away from its default, is refused with its name."""
        allowed = set(TASK_ONLY_KEYS.get(self.type, ()))
        if self.type in ("generate", "score"):
            allowed.update(GENERATE_KEYS)  # score has always tolerated generate's keys
        for f in dataclasses.fields(self):
            owners = [t for t, names in TASK_ONLY_KEYS.items() if f.name in names]
            if f.name in GENERATE_KEYS:
                owners.append("generate")
            if not owners or f.name in allowed:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                raise SpecError(
                    f"{key}.{f.name}: applies to {' and '.join(owners)} tasks, "
                    f"not to {self.type}; remove it"
                )


@dataclass(frozen=True)
class InputSpec:
    """Where the prompts are and which columns mean what."""

    path: list[str]
    format: Literal["auto", "jsonl", "parquet", "hf", "openai"] = "auto"
    prompt_column: str = "prompt"
    completion_column: str | None = None
    choices_column: str | None = None
    id_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    split: str | None = None  # a saved DatasetDict's split

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give at least one file, folder or glob")
        reserved = {"id", "error"}
        for name in self.keep_columns:
            if name in reserved:
                raise SpecError(
                    f"{key}.keep_columns: '{name}' clashes with an output column of the same name"
                )
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise SpecError(f"{key}.keep_columns: a column is listed twice")
        if self.choices_column and self.completion_column:
            raise SpecError(
                f"{key}: give completion_column or choices_column, not both "
                "(a single completion is a list of one choice)"
            )


@dataclass(frozen=True)
class OutputSpec:
    path: str
    # auto: Parquet, plus OUT/responses.jsonl when the input is an OpenAI batch file;
    # openai: responses.jsonl always (generate only); parquet: Parquet only.
    format: Literal["auto", "parquet", "openai"] = "auto"

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give an output folder")


@dataclass(frozen=True)
class BatchingSpec:
    """Token budget per batch: rows x padded length (plus new tokens for generate)."""

    max_tokens: int | Auto = "auto"
    # auto: what the engine keeps busy (resolved in job/budget.py)
    max_batch_size: int | Auto = "auto"
    sort: Literal["length", "none"] = "length"
    # A batch at least a quarter full stops taking rows that would push its padding past this.
    max_padding: float = 0.1

    def validate(self, key: str) -> None:
        if not 0.0 <= self.max_padding <= 1.0:
            raise SpecError(f"{key}.max_padding: {self.max_padding} must be between 0 and 1")
        if self.max_tokens != "auto":
            _at_least(self.max_tokens, 16, f"{key}.max_tokens")
        if self.max_batch_size != "auto":
            _at_least(self.max_batch_size, 1, f"{key}.max_batch_size")


@dataclass(frozen=True)
class CheckpointSpec:
    every_rows: int = 2000

    def validate(self, key: str) -> None:
        _at_least(self.every_rows, 1, f"{key}.every_rows")


@dataclass(frozen=True)
class ProgressSpec:
    log_every_seconds: float = 30.0

    def validate(self, key: str) -> None:
        _at_least(self.log_every_seconds, 0.1, f"{key}.log_every_seconds")


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    task: TaskSpec = field(default_factory=TaskSpec)
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    progress: ProgressSpec = field(default_factory=ProgressSpec)
    # record: a row that cannot run gets an `error` value and the job goes on; fail: it stops
    # the job (before the model loads, for problems found while reading).
    on_error: Literal["record", "fail"] = "record"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    from_command_line = {_apply_override(data, item) for item in overrides}
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


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"{path}: no such job spec file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if data is None:
        raise SpecError(f"{path}: the job spec is empty")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a mapping of sections (model, task, input, ...)")
    return data


def _apply_override(data: dict, item: str) -> str:
    """`--set task.max_new_tokens=64`: the value is parsed as YAML, so lists and numbers work.

    Returns the dotted key that was set."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. task.max_new_tokens=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def _normalise_input_path(data: dict) -> None:
    section = data.get("input")
    if isinstance(section, dict) and isinstance(section.get("path"), str):
        section["path"] = [section["path"]]


def _build(cls: type, data: Any, key: str) -> Any:
    """Turn a mapping into the dataclass `cls`, checking keys and types field by field."""
    label = key or "the job spec"
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            known = {f"{key}.{f}" if key else f for f in fields}
            raise SpecError(f"unknown key '{where}'{did_you_mean(where, known)}")
    values = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"missing key '{where}'")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
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
                pass
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
            raise SpecError(f"{key}: expected a list, got {_kind(value)}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{key}: expected a whole number, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{key}: expected a number, got {_kind(value)}")
        return float(value)
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


def _at_least(value: float | None, low: float, key: str) -> None:
    if value is not None and value < low:
        raise SpecError(f"{key}: {value} is too small (the least allowed is {low})")


PACKAGE_PREFIX = "package:"


def _resolve_paths(spec: JobSpec, base: Path, from_command_line: set[str]) -> JobSpec:
    """Relative paths written in the spec are relative to the spec file's folder; paths given on
    the command line (--set, --output) are relative to the current directory, as a shell user
    expects."""

    def resolve(p: str, key: str) -> str:
        expanded = os.path.expanduser(os.path.expandvars(p))
        if os.path.isabs(expanded):
            return os.path.normpath(expanded)
        root = Path.cwd() if key in from_command_line else base
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
    if not spec.model.path.startswith(PACKAGE_PREFIX) and not os.path.exists(spec.model.path):
        raise SpecError(f"model.path: {spec.model.path} does not exist")
    for p in spec.input.path:
        if not (os.path.exists(p) or glob.glob(p, recursive=True)):
            raise SpecError(f"input.path: {p} matches no file")
