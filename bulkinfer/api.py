"""bulkinfer as a library: the same jobs as the command line, from Python.

    import bulkinfer
    summary = bulkinfer.run("jobs/sample.yaml", task={"max_new_tokens": 32}, output="out/try")
    print(summary["output_tokens_per_second"])

A job is a YAML file, a mapping shaped like one, or a `JobSpec`; keyword overrides are either
sections (`task={"max_new_tokens": 32}`) or dotted keys (`**{"task.max_new_tokens": 32}`), as
`--set` gives them, and `output` is the output folder. Errors a user can cause raise
`bulkinfer.errors.UserError` subclasses, with the one line the command line prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from bulkinfer.errors import SpecError, UserError
from bulkinfer.io.layout import OutputLayout
from bulkinfer.process import imports_uninterrupted
from bulkinfer.spec import JobSpec, load_spec
from bulkinfer.state.records import Summary


class JobStopped(UserError):
    """The run was stopped by a signal after committing the batch in flight; rerun to resume.
    `exit_code` is the command line's for that signal (130 for SIGINT, 143 for SIGTERM).
    A UserError, so `except Exception` catches it too: a loop over jobs that should end on
    Ctrl-C catches JobStopped first."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@imports_uninterrupted
def load(job: str | os.PathLike | dict | JobSpec, **overrides: Any) -> JobSpec:
    """The validated job spec; relative paths in a file are relative to the file's folder,
    those in overrides or in a mapping to the current folder."""
    if isinstance(job, JobSpec):
        if overrides:
            raise TypeError("overrides apply to a YAML file or a mapping, not to a JobSpec")
        return job
    if not isinstance(job, str | os.PathLike | dict):
        raise TypeError(
            f"job must be a YAML file's path, a mapping or a JobSpec, not {type(job).__name__}"
        )
    output = overrides.pop("output", None)
    if isinstance(output, os.PathLike):
        output = os.fspath(output)
    if isinstance(output, dict):  # the section, as task={...} is (its path among its keys)
        overrides["output"], output = output, None
    sets = [f"{key}={_json(value, key)}" for key, value in _dotted(overrides)]
    if isinstance(job, dict):
        return load_spec(None, sets, output=output, data=json.loads(_json(job, "the job")))
    return load_spec(Path(job), sets, output=output)


def _json(value: Any, where: str) -> str:
    """A setting as JSON text (which YAML reads back): paths as their text; a value no job
    file can hold (NaN, an object) is refused naming its key."""

    def text_of(item: Any) -> str:
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        raise TypeError(type(item).__name__)

    try:
        return json.dumps(value, default=text_of, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {value!r} is not a value a job file can hold ({exc})") from None


@imports_uninterrupted
def run(
    job: str | os.PathLike | dict | JobSpec,
    *,
    overwrite: bool = False,
    shard: str | tuple[int, int] | None = None,
    **overrides: Any,
) -> dict:
    """Run or resume a job (or shard "I/N", or (I, N), of it); returns its summary
    (summary.json)."""
    from bulkinfer.job.runner import run_job
    from bulkinfer.sharding import parse_shard

    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, not {overwrite!r}")
    if isinstance(shard, tuple) and len(shard) == 2:
        shard = f"{shard[0]}/{shard[1]}"
    if shard is not None and not isinstance(shard, str):
        raise TypeError(f"shard must be 'I/N' (or a pair (I, N)), not {shard!r}")
    with _api_words():
        spec = load(job, **overrides)
        chosen = parse_shard(shard) if shard else None
        code = run_job(spec, overwrite=overwrite, shard=chosen)
    if code != 0:
        raise JobStopped(f"stopped by a signal (exit code {code}); run it again to resume", code)
    layout = OutputLayout(Path(spec.output.path))
    if chosen is not None:
        layout = layout.shard(chosen.index, chosen.count)
    return Summary.read_if_there(layout.summary).to_dict()


@imports_uninterrupted
def plan(job: str | os.PathLike | dict | JobSpec, **overrides: Any) -> dict:
    """What `bulkinfer plan --json` prints: rows, lengths, budget and batches; no weights."""
    from bulkinfer.job.planning import plan_job

    with _api_words():
        return plan_job(load(job, **overrides))


@imports_uninterrupted
def validate(job: str | os.PathLike | dict | JobSpec, **overrides: Any):
    """What `bulkinfer validate` checks; raises the first problem as a UserError."""
    from bulkinfer.job.validate import check_job

    with _api_words():
        return check_job(load(job, **overrides))


# the command line's words in messages, and what a caller of this module passes instead
API_WORDS = (
    (re.compile(r"--overwrite\b"), "overwrite=True"),
    (re.compile(r"another --output\b"), "another output.path"),
    # `--shard 5/2`, `--shard 'x'`, `--shard I/N`: the flag and its value, as the argument
    (re.compile(r"--shard (?:'([^']*)'|([^\s,;:)'`]+))"), lambda m: f"shard='{m[1] or m[2]}'"),
    (re.compile(r"e\.g\. shard='0/8'"), "e.g. shard='0/8' or (0, 8)"),
    (re.compile(r"rerun the same command"), "run it again"),
)


@contextlib.contextmanager
def _api_words():
    """A UserError raised as the command line words it, reworded for a caller of this module
    (overwrite=True where the command says --overwrite); the same error class."""
    try:
        yield
    except UserError as exc:
        text = str(exc)
        for pattern, words in API_WORDS:
            text = pattern.sub(words, text)
        if text == str(exc) or type(exc).__init__ is not UserError.__init__:
            raise
        raise type(exc)(text) from None


def _dotted(overrides: dict) -> list[tuple[str, Any]]:
    """Section mappings as dotted keys: {"task": {"n": 2}} -> [("task.n", 2)]. A section's
    settings are set one by one (an empty one sets nothing; it used to reset the section to
    its defaults), and a setting whose value is a mapping (task.response_format) is set
    whole, as in a YAML file, not merged into the job's."""
    out = []
    for key, value in overrides.items():
        if "." not in key and isinstance(value, dict):
            out += [(f"{key}.{name}", setting) for name, setting in value.items()]
        else:
            out.append((key, value))
    return out
