"""The CLI a newcomer meets: help with examples, `init`, `validate`, and JSON logs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import pytest
import yaml
from conftest import (
    ROOT,
    child_env,
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
    write_parquet,
)

import bulkinfer
from bulkinfer import spec as specs
from bulkinfer.cli import main
from bulkinfer.spec import load_spec


def test_help_of_every_command_shows_an_example():
    assert "Example" in cli("--help").output
    for name in main.commands:
        result = cli(name, "--help")
        assert result.exit_code == 0
        assert "Example" in result.output and f"bulkinfer {name}" in result.output, name


def _fill_in(text: str, model, inputs, output) -> str:
    return (
        text.replace("path: models/my-model", f"path: {model}")
        .replace("path: data/*.parquet", f"path: {inputs}")
        .replace("path: out/my-job", f"path: {output}")
    )


def test_init_writes_every_key_with_its_default_and_a_comment(tmp_path, tiny_model):
    path = tmp_path / "job.yaml"
    result = cli("init", str(path))
    assert result.exit_code == 0, result.output
    text = path.read_text()
    data = yaml.safe_load(text)
    hints = typing.get_type_hints(specs.JobSpec)
    for section in dataclasses.fields(specs.JobSpec):
        assert section.name in data, section.name
        if dataclasses.is_dataclass(hints[section.name]):
            keys = {f.name for f in dataclasses.fields(hints[section.name])}
            assert set(data[section.name]) == keys, section.name
    key_lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert all("#" in line for line in key_lines), [ln for ln in key_lines if "#" not in ln]

    # Once the three paths are filled in, bulkinfer's own loader accepts it, with the defaults.
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    path.write_text(_fill_in(text, tiny_model, inputs, tmp_path / "out"))
    spec = load_spec(path)
    assert spec.task == specs.TaskSpec()
    assert spec.batching == specs.BatchingSpec()
    assert spec.checkpoint == specs.CheckpointSpec()
    assert spec.progress == specs.ProgressSpec()
    assert spec.on_error == "record"
    assert dataclasses.replace(spec.model, path="x") == specs.ModelSpec(path="x")
    assert dataclasses.replace(spec.input, path=["x"]) == specs.InputSpec(path=["x"])
    assert cli("validate", str(path)).exit_code == 0
    # Every task type accepts the template: its keys of other types hold their defaults.
    task_types = typing.get_args(typing.get_type_hints(specs.TaskSpec)["type"])
    for task_type in task_types:
        assert load_spec(path, [f"task.type={task_type}"]).task.type == task_type


def test_init_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("mine\n")
    result = cli("init", str(path))
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output
    assert path.read_text() == "mine\n"
    assert cli("init", str(path), "--force").exit_code == 0
    assert "model:" in path.read_text()


def test_init_does_not_replace_a_link_unless_forced(tmp_path):
    """A dangling link at the path was replaced by a file: exists() follows links."""
    link = tmp_path / "job.yaml"
    link.symlink_to(tmp_path / "nowhere.yaml")
    result = cli("init", str(link))
    assert result.exit_code == 2 and "already exists" in result.output, result.output
    assert link.is_symlink()


def test_a_section_set_on_the_command_line_has_paths_relative_to_the_current_folder(
    tmp_path, tiny_model, monkeypatch
):
    """`--set output={path: out}` resolved the path against the job file's folder, where
    `--set output.path=out` resolves it against the current one, as the README says."""
    jobs, here = tmp_path / "jobs", tmp_path / "here"
    jobs.mkdir()
    here.mkdir()
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job = write_job(jobs / "j.yaml", tiny_model, inputs, tmp_path / "out")
    monkeypatch.chdir(here)
    for item in ("output.path=mine", "output={path: mine}"):
        assert load_spec(str(job), [item]).output.path == str(here / "mine"), item


def test_a_section_set_as_a_mapping_keeps_the_spec_s_other_settings(tmp_path, tiny_model):
    """`--set 'input={path: other.jsonl}'` sets the path alone, as the Python API's
    `input={...}` does: the spec's kept columns (and a task's system prompt) were dropped
    silently, and the outputs lost their columns. The spec's own relative paths stay
    relative to its folder."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    rows = [{"id": "a", "prompt": "hi", "source": "s"}]
    write_jsonl(jobs / "in.jsonl", rows)
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    job = write_job(
        jobs / "j.yaml",
        tiny_model,
        "in.jsonl",
        tmp_path / "out",
        input={"keep_columns": ["source"]},
        task={"system_prompt": "Be brief.", "max_new_tokens": 3},
    )
    spec = load_spec(str(job), [f"input={{path: {other}}}", "task={max_new_tokens: 2}"])
    assert spec.input.path == [str(other)] and spec.input.keep_columns == ["source"]
    assert spec.task.system_prompt == "Be brief." and spec.task.max_new_tokens == 2
    spec = load_spec(str(job), ["input={keep_columns: []}"])
    assert spec.input.path == [str(jobs / "in.jsonl")] and spec.input.keep_columns == []
    assert spec == bulkinfer.load(job, input={"keep_columns": []})


def test_a_whole_number_out_of_range_is_said_for_keys_that_also_take_auto(tmp_path, tiny_model):
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job = write_job(tmp_path / "j.yaml", tiny_model, inputs, tmp_path / "out")
    for key in ("batching.max_tokens", "batching.max_batch_size"):
        result = cli("validate", str(job), "--set", f"{key}=99999999999999999999999")
        assert result.exit_code == 2 and "does not fit in a 64-bit integer" in result.output, (
            result.output
        )


def test_init_without_a_path_writes_job_yaml_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("init").exit_code == 0
    assert (tmp_path / "job.yaml").exists()


@pytest.fixture()
def broken_weights_model(tmp_path, tiny_model):
    """The tiny model with its weights replaced by garbage: only a run would notice."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return model


def test_validate_checks_columns_and_counts_rows_without_loading_weights(
    tmp_path, broken_weights_model
):
    rows = sample_prompts(25)
    job = write_job(
        tmp_path / "job.yaml",
        broken_weights_model,
        [
            write_jsonl(tmp_path / "a.jsonl", rows[:10]),
            write_parquet(tmp_path / "b.parquet", rows[10:]),
        ],
        tmp_path / "out",
        input={"keep_columns": ["source"]},
    )
    result = cli("validate", str(job))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    assert "2 files, 25 rows" in result.output
    assert "keep source" in result.output and "new folder" in result.output
    # The same job really cannot run: the weights were never read by validate.
    assert cli_subprocess("run", str(job)).returncode != 0


def test_validate_says_what_run_would_do_with_a_job_s_folder(tmp_path, tiny_model):
    """A finished job's folder was said to be one "run resumes", where run does nothing."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "j.yaml", tiny_model, inputs, tmp_path / "out")
    assert cli("run", str(job)).exit_code == 0
    result = cli("validate", str(job))
    assert result.exit_code == 0 and "finished: run has nothing to do" in result.output, (
        result.output
    )
    (tmp_path / "out" / "summary.json").unlink()  # stopped before its summary: run resumes
    result = cli("validate", str(job))
    assert result.exit_code == 0 and "run resumes it" in result.output, result.output


def test_validate_refuses_a_finished_folder_whose_input_or_model_changed(tmp_path, tiny_model):
    """validate said such a folder "holds this job, finished"; run then refused it. Both now
    give run's reason: the input's contents and the model's files are compared, as run does."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(6))
    job = write_job(tmp_path / "j.yaml", tiny_model, inputs, tmp_path / "out")
    assert cli("run", str(job)).exit_code == 0
    other_model = tmp_path / "model2"
    shutil.copytree(tiny_model, other_model)
    weights = other_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, another last byte
    weights.write_bytes(bytes(data))
    result = cli("validate", str(job), "--set", f"model.path={other_model}")
    assert result.exit_code == 2 and "the model files differ" in result.output, result.output
    assert cli("run", str(job), "--set", f"model.path={other_model}").exit_code == 2
    write_jsonl(inputs, sample_prompts(5))  # edited since
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, (command, result.output)
        assert "the input files changed since the checkpoint" in result.output, result.output


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("input.prompt_column=promt", "no column 'promt' (did you mean 'prompt'?)"),
        ("input.keep_columns=[sourse]", "no column 'sourse' (did you mean 'source'?)"),
        ("input.id_column=key", "no column 'key'"),
        ("task.max_new_tokens=0", "task.max_new_tokens"),
        ("batching.max_tokns=5", "unknown key 'batching.max_tokns'"),
        ('task.stop=[","', "--set task.stop: '[\",\"' is not valid YAML"),
        ("task.response_format={type: regex", "quote the whole value to pass it as text"),
        # a stop string no output can hold was never met; a system prompt failed every row
        (
            r'task.stop=["ok", "\ud800"]',
            r"task.stop[1]: not valid Unicode: a lone surrogate '\ud800'",
        ),
        (r'task.system_prompt="be \udfff"', "task.system_prompt: not valid Unicode"),
    ],
)
def test_validate_names_the_problem_in_one_line(tmp_path, tiny_model, setting, expected):
    rows = sample_prompts(5)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        [write_parquet(tmp_path / "b.parquet", rows)],
        tmp_path / "out",
    )
    proc = cli_subprocess("validate", str(job), "--set", setting)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bulkinfer: error:"), proc.stderr
    assert expected in lines[0]


def test_an_output_folder_under_a_file_is_refused_by_validate_and_run(tmp_path, tiny_model):
    """A folder that cannot be made (a file above it) is a one-line error, exit 2, from validate
    and run alike; run used to fail writing it, exit 74."""
    (tmp_path / "afile").write_text("x")
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "afile" / "out")
    for command in ("validate", "run"):
        proc = cli_subprocess(command, str(job))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().endswith("afile is a file, not a folder"), proc.stderr


def test_validate_jsonl_keep_column_and_foreign_output_folder(tmp_path, tiny_model):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(5))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    result = cli("validate", str(job), "--set", "input.keep_columns=[sorce]")
    assert result.exit_code == 2
    assert "no row has the keep column 'sorce' (did you mean 'source'?)" in result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("someone else's")
    result = cli("validate", str(job))
    assert result.exit_code == 2
    assert "not empty and holds no bulkinfer job" in result.output


def _events(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    events = [json.loads(line) for line in lines]  # every line must be JSON
    for e in events:
        assert {"ts", "level", "event", "message"} <= e.keys(), e
        # a warning names its event, or is a `warning` event (never the generic `info`)
        assert e["level"] == "info" or e["event"] != "info", e
    return events


def test_json_logs_every_stderr_line_an_event_through_stop_and_resume(tmp_path, tiny_model):
    rows = sample_prompts(30)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        batching={"max_tokens": 400, "max_batch_size": 4},
        checkpoint={"every_rows": 4},
        progress={"log_every_seconds": 0.1},
    )
    temporary = tmp_path / "tmp"  # where the spill files go: empty after each run
    temporary.mkdir()
    env = {**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.3", "TMPDIR": str(temporary)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "--log-format", "json", "run", str(job)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest = tmp_path / "out" / "checkpoint" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert not list(temporary.glob("bulkinfer-spill-*")), "a stopped run left its spill files"
    first = [e for e in _events(stderr) if e["event"] != "tokenize"]  # a slow read's lines
    names = [e["event"] for e in first]
    assert names[0] == "start" and first[0]["rows"] == 30
    assert {"progress", "checkpoint", "signal"} <= set(names)
    assert first[-1]["event"] == "signal" and first[-1]["exit_code"] == 128 + signal.SIGTERM
    progress = [e for e in first if e["event"] == "progress"]
    assert all(e["rows_total"] == 30 and 0 < e["rows_done"] <= 30 for e in progress)

    # The environment variable does the same as the option; the resumed run says so.
    env = {**child_env(), "BULKINFER_LOG_FORMAT": "json", "TMPDIR": str(temporary)}
    resumed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list(temporary.glob("bulkinfer-spill-*")), "a finished run left its spill files"
    second = _events(resumed.stderr)
    # (a read slower than progress.log_every_seconds says how far it got first)
    names = [e["event"] for e in second if e["event"] != "tokenize"]
    assert names[0] == "resume" and "start" in names and names[-1] == "finish"
    finish = second[-1]
    assert finish["rows_out"] == 30 and finish["rows_by_status"] == {"ok": 30, "error": 0}
    assert max(e["rows_done"] for e in second if e["event"] == "progress") == 30
    assert resumed.stdout == ""  # the terminal table is for the plain format
    assert read_outputs(tmp_path / "out").num_rows == 30


def test_json_logs_name_a_warning_a_warning_event(tmp_path, tiny_model):
    """Warnings without an event of their own (rows that failed, among others) were `info`
    events: a collector filtering on the event missed them."""
    rows = [*sample_prompts(3), {"id": "none", "prompt": None}]
    job = write_job(
        tmp_path / "job.yaml", tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o"
    )
    proc = cli_subprocess("--log-format", "json", "run", str(job))
    assert proc.returncode == 0, proc.stderr
    (failed,) = [e for e in _events(proc.stderr) if "rows failed" in e["message"]]
    assert failed["level"] == "warning" and failed["event"] == "warning", failed


def test_json_logs_report_user_errors_as_one_error_event(tmp_path, tiny_model):
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(3)),
        tmp_path / "out",
    )
    proc = cli_subprocess("--log-format", "json", "run", str(job), "--set", "task.typo=1")
    assert proc.returncode == 2
    (event,) = _events(proc.stderr)
    assert event["event"] == "error" and event["level"] == "error"
    assert event["exit_code"] == 2 and "unknown key 'task.typo'" in event["message"]
    # The option also works after the subcommand; a usage error is an event too.
    proc = cli_subprocess("run", str(job), "--log-format", "json", "--shard", "x")
    (event,) = _events(proc.stderr)
    assert proc.returncode == 2 and event["event"] == "error" and "--shard" in event["message"]
    plain = cli_subprocess("run", str(job), "--set", "task.typo=1")
    assert plain.stderr.startswith("bulkinfer: error: unknown key 'task.typo'")


def test_bytecode_is_kept_in_the_cache_folder_when_python_may_not_write_it(tmp_path):
    """Under PYTHONDONTWRITEBYTECODE (as many container images set) every process would compile
    torch and transformers from source again; bulkinfer keeps that bytecode in its cache."""
    import subprocess
    import sys

    code = "import sys, bulkinfer.cli; print(sys.pycache_prefix)"
    env = {**child_env(), "PYTHONDONTWRITEBYTECODE": "1", "BULKINFER_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "pycache"), out.stderr
    assert list((tmp_path / "pycache").rglob("cli*.pyc")), "no bytecode written for bulkinfer.cli"
    env["BULKINFER_PYCACHE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr


def test_a_run_never_imports_what_transformers_would_import_unused(tmp_path, tiny_model):
    """Installed, scikit-learn and SciPy are imported by transformers as it loads, and pandas by
    pyarrow as it first converts Python values, for features bulkinfer never calls (~2 s of a
    GPU box's start). Stand-ins that fail when imported are first on the path: transformers
    alone imports one; `bulkinfer run` and `plan` do not, and the run's outputs are those of a
    run in this process."""
    fakes = tmp_path / "fakes"
    for name in ("scipy", "sklearn", "pandas"):
        (fakes / name).mkdir(parents=True)
        (fakes / name / "__init__.py").write_text(f"raise RuntimeError('{name} was imported')\n")
    env = {**child_env(), "PYTHONPATH": f"{fakes}{os.pathsep}{ROOT}"}
    plain = subprocess.run(
        [sys.executable, "-c", "import transformers.models.llama.modeling_llama"],
        capture_output=True,
        text=True,
        env=env,
    )
    if "was imported" not in plain.stderr:
        pytest.skip("this transformers imports neither scikit-learn nor SciPy as it loads")
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(12))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    for command in (["plan", str(job)], ["run", str(job)]):
        proc = subprocess.run(
            [sys.executable, "-m", "bulkinfer", *command],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    in_process = write_job(tmp_path / "job2.yaml", tiny_model, inputs, tmp_path / "out2")
    assert cli("run", str(in_process)).exit_code == 0
    assert read_outputs(tmp_path / "out").equals(read_outputs(tmp_path / "out2"))


def test_a_killed_run_s_spill_files_are_removed_by_the_next_run_on_the_host(tmp_path, tiny_model):
    """Planning tokenizes into a temporary folder named for its host and process. A process
    killed outright (SIGKILL) leaves it; the next run on the host removes such folders of dead
    processes, and keeps those of live processes and of other hosts (a shared temporary
    folder). The run itself leaves none."""
    from bulkinfer.io.spill import SPILL_PREFIX
    from bulkinfer.process import host_tag

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = temporary / f"{SPILL_PREFIX}{host_tag()}-{gone.pid}-abc"
    running = temporary / f"{SPILL_PREFIX}{host_tag()}-{os.getpid()}-def"
    elsewhere = temporary / f"{SPILL_PREFIX}otherhost-{gone.pid}-ghi"
    for folder in (killed, running, elsewhere):
        folder.mkdir()
        (folder / "rows-000000.parquet").write_bytes(b"x")
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(12))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "plan", str(job)],
        capture_output=True,
        text=True,
        env={**child_env(), "TMPDIR": str(temporary)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(temporary.iterdir()) == sorted([running, elsewhere])


# a real SIGINT, sent by the process to itself at the moment named: while the command line's
# own modules import (before bulkinfer.cli exists), while numpy imports, and while click reads
# the arguments
INTERRUPTED_AT = {
    "import": (
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bulkinfer.cli':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Stop())\n"
    ),
    # numpy's import cut short by the Ctrl-C cannot run again ("cannot load module more than
    # once per process"): the handler's own imports must not need it
    "numpy": (
        "class Stop:\n"
        "    seen = False\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numpy':\n"
        "            if Stop.seen:\n"
        "                raise ImportError('cannot load module more than once per process')\n"
        "            Stop.seen = True\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Stop())\n"
    ),
    "arguments": (
        "import click\n"
        "init = click.Context.__init__\n"
        "def interrupted(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    init(self, *args, **kwargs)\n"
        "click.Context.__init__ = interrupted\n"
    ),
}


@pytest.mark.parametrize("log_format", ["plain", "json"])
@pytest.mark.parametrize("moment", sorted(INTERRUPTED_AT))
def test_ctrl_c_before_the_command_starts_is_one_line_and_exit_130(tmp_path, moment, log_format):
    """A Ctrl-C in a command's first fraction of a second gave a traceback (during imports) or
    click's 'Aborted!' with exit 1 (while the arguments were read)."""
    code = (
        "import os, signal, sys\n"
        # Python's own Ctrl-C handler, as in a terminal (a test worker may start its children
        # with SIGINT ignored)
        + "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        + INTERRUPTED_AT[moment]
        + "from bulkinfer.console import entry\n"
        + "entry()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--log-format", log_format, "status", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    if log_format == "plain":
        assert result.stderr == "bulkinfer: interrupted\n", result.stderr
    else:  # the signal event, as a stop later in the command logs it
        (event,) = [json.loads(line) for line in result.stderr.splitlines()]
        assert event["event"] == "signal" and event["exit_code"] == 130, event
        assert event["message"] == "interrupted" and event["signal"] == "SIGINT", event


def test_ctrl_c_of_an_overwrite_run_says_to_resume_without_overwrite(tmp_path, tiny_model):
    """The same command again, --overwrite and all, would start the job afresh."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(8))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--overwrite"],
        env={**child_env(), "BULKINFER_SLOW_LOAD_SECONDS": "60"},
        stderr=subprocess.PIPE,
        text=True,
        # Python's own Ctrl-C handling, as in a terminal (a test worker's children may start
        # with SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lock = tmp_path / "out" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.02)
    time.sleep(1.0)  # into the (slowed) load
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted; committed work is kept: rerun it without --overwrite" in stderr, stderr


def test_a_log_line_is_one_write_so_threads_never_share_a_line(monkeypatch):
    """The part writer's thread logs beside the main thread: a line written as its text and
    then its newline let the other thread's line in between (two JSON objects on one line,
    then an empty one, seen in a run with frequent progress and checkpoint lines)."""
    import sys
    import threading

    from bulkinfer.observe import progress

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setenv("BULKINFER_LOG_FORMAT", "json")
    monkeypatch.setattr(sys, "stderr", Recorder())

    def many(event: str) -> None:
        for i in range(200):
            progress.log(f"{event} {i}", event=event)

    threads = [threading.Thread(target=many, args=(e,)) for e in ("progress", "checkpoint")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 400
    for text in writes:
        assert text.endswith("\n") and text.count("\n") == 1, repr(text)
        assert json.loads(text)["event"] in ("progress", "checkpoint")


ON_A_TERMINAL = """
import fcntl, os, struct, sys, termios
fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
os.execvp(sys.executable, [sys.executable, "-m", "bulkinfer", "run", sys.argv[1]])
"""


def test_a_line_said_while_the_bar_is_drawn_starts_a_line_of_its_own(tmp_path, tiny_model):
    """On a terminal, the line a Ctrl-C prints (and any other said mid-run) was written onto
    the progress bar's line: `... ETA 0:00:02][bulkinfer] SIGINT received`."""
    import pty
    import re
    import select

    rows = [{"id": i, "prompt": "hello world " * (1 + i % 20)} for i in range(120)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"type": "generate", "max_new_tokens": 32},
        batching={"max_batch_size": 16, "max_tokens": 16384},
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 120 columns wide (a new pty has none)
        try:
            os.execve(sys.executable, [sys.executable, "-c", ON_A_TERMINAL, str(job)], child_env())
        finally:
            os._exit(127)
    said, sent, deadline = b"", False, time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child is gone
                break
            if not data:
                break
            said += data
        if not sent and re.search(rb" [1-9][0-9]*/120 rows", said):  # the bar drawn, rows done
            os.kill(pid, signal.SIGINT)
            sent = True
    _, status = os.waitpid(pid, 0)
    assert sent and os.waitstatus_to_exitcode(status) == 130, said[-2000:]
    assert said.count(b"[bulkinfer]") >= 3, said[-2000:]  # the start, the stop, its end
    for at in range(len(said)):
        if said.startswith(b"[bulkinfer]", at):
            assert at == 0 or said[at - 1 : at] in (b"\r", b"\n"), said[max(0, at - 200) : at + 80]


def _slowed_run(tmp_path, model, setting: str, seconds: str) -> str:
    """The stderr of a three-row run with one phase stretched (a faults.py setting)."""
    job = write_job(
        tmp_path / "job.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(3)),
        tmp_path / "out",
    )
    done = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env={**child_env(), setting: seconds},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_long_model_hash_says_what_the_run_waits_for(tmp_path, tiny_model):
    """A large model's first run hashes its files for the job's fingerprint (minutes for a 70B
    model): the run said nothing meanwhile."""
    # the hash starts as set-up begins, and the run says so once it has waited 5 s for it: on a
    # loaded machine the set-up before that wait takes seconds of the 14
    said = _slowed_run(tmp_path, tiny_model, "BULKINFER_SLOW_HASH_SECONDS", "14")
    (line,) = [x for x in said.splitlines() if "to fingerprint the job" in x]
    assert "hashing the model's files (0.0 GB)" in line, line
    assert said.index("to fingerprint the job") < said.index("3 rows, 1 batch")


def test_a_long_load_says_the_run_waits_for_the_weights(tmp_path, tiny_model):
    """A 70B model's weights take minutes to load after the input is tokenized: the run said
    nothing meanwhile."""
    said = _slowed_run(tmp_path, tiny_model, "BULKINFER_SLOW_LOAD_SECONDS", "7")
    (line,) = [x for x in said.splitlines() if "waiting for the weights" in x]
    assert "input is ready (3 rows)" in line and " GB on disk" in line, line
    assert said.index("waiting for the weights") < said.index("3 rows, 1 batch")
