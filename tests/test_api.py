"""bulkinfer as a library: the same job through `bulkinfer.run` and through the command line
gives the same outputs, overrides apply as --set does, and user errors raise one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl

import bulkinfer
from bulkinfer.errors import SpecError


def test_run_returns_the_summary_and_equals_the_cli(tmp_path, tiny_model):
    rows = sample_prompts(24)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "cli",
    )
    assert cli("run", str(job)).exit_code == 0
    summary = bulkinfer.run(job, output=str(tmp_path / "api"), task={"max_new_tokens": 6})
    assert summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert summary["rows_out"] == 24 and summary["complete"]
    by_cli, by_api = read_outputs(tmp_path / "cli"), read_outputs(tmp_path / "api")
    assert by_api.column("text").to_pylist() == by_cli.column("text").to_pylist()


def test_a_job_runs_from_a_thread_other_than_the_main_one(tmp_path, tiny_model):
    """Signals reach the main thread only: a job run from another leaves the handlers alone."""
    import threading

    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(6)),
        tmp_path / "out",
    )
    result = {}
    thread = threading.Thread(target=lambda: result.update(bulkinfer.run(job)))
    thread.start()
    thread.join(timeout=300)
    assert result.get("rows_out") == 6 and result["complete"], result
    assert read_outputs(tmp_path / "out").num_rows == 6


def test_overrides_as_sections_or_dotted_keys_and_a_mapping_as_the_job(tmp_path, tiny_model):
    data = {
        "model": {"path": str(tiny_model)},
        "task": {"type": "generate", "max_new_tokens": 6},
        "input": {"path": str(write_jsonl(tmp_path / "in.jsonl", sample_prompts(8)))},
        "output": {"path": str(tmp_path / "out")},
    }
    spec = bulkinfer.load(data, task={"max_new_tokens": 3}, **{"batching.max_batch_size": 2})
    assert spec.task.max_new_tokens == 3 and spec.batching.max_batch_size == 2
    summary = bulkinfer.run(spec)
    assert summary["rows_out"] == 8
    assert max(read_outputs(tmp_path / "out").column("output_tokens").to_pylist()) <= 3
    plan = bulkinfer.plan(data, **{"batching.max_batch_size": 2})
    assert plan["batches_sorted"] == 4 and plan["batch_rows"] == [2, 2, 2, 2]
    # an empty section sets nothing (it reset the job's task to the defaults); a setting whose
    # value is a mapping replaces the job's whole, as in YAML (merged, a json_schema's
    # `schema` stayed beside the regex's `pattern`)
    data["task"]["response_format"] = {"type": "json_schema", "schema": {"type": "object"}}
    assert bulkinfer.load(data, task={}).task.max_new_tokens == 6
    regex = {"type": "regex", "pattern": "[a-z]+"}
    assert bulkinfer.load(data, task={"response_format": regex}).task.response_format == regex


def test_a_bad_override_raises_the_one_line_error(tmp_path, tiny_model):
    job = write_job(tmp_path / "job.yaml", tiny_model, tmp_path / "in.jsonl", tmp_path / "out")
    write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    with pytest.raises(SpecError, match="task.max_new_tokenz.*did you mean 'task.max_new_tokens'"):
        bulkinfer.run(job, task={"max_new_tokenz": 3})


def test_paths_are_taken_and_wrong_types_refused_before_any_work(tmp_path, tiny_model):
    """pathlib paths wherever a path goes; a non-bool overwrite ("false" is true in Python:
    it wiped a finished job), a shard that is neither "I/N" nor a pair, NaN, a job of another
    type: each one clear error, nothing run."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "unused")
    data = {"model": {"path": tiny_model}, "input": {"path": inputs}, "task": {"max_new_tokens": 2}}
    out = tmp_path / "out"
    assert bulkinfer.load(job, output=out).output.path == str(out)
    spec = bulkinfer.load(data, output=out, **{"model.path": tiny_model})
    assert spec.model.path == str(tiny_model)
    first = bulkinfer.run(job, output=out, shard=(0, 2))
    assert first["rows_out"] == 2
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        bulkinfer.run(job, output=out, shard="0/2", overwrite="false")
    assert bulkinfer.run(job, output=out, shard="0/2") == first  # finished, untouched
    with pytest.raises(TypeError, match="shard must be"):
        bulkinfer.run(job, output=out, shard=1)
    with pytest.raises(SpecError, match="task.temperature: nan"):
        bulkinfer.load(job, task={"temperature": float("nan")})
    with pytest.raises(TypeError, match="not int"):
        bulkinfer.load(42)
    with pytest.raises(SpecError, match="is a folder; give the job's YAML file"):
        bulkinfer.load(tmp_path)


NOTEBOOK = """
import json, os, sys
import transformers
import bulkinfer
from bulkinfer.engines import constraints

job, out = sys.argv[1], sys.argv[2]
os.environ.pop("TOKENIZERS_PARALLELISM", None)
transformers.utils.logging.enable_progress_bar()
import huggingface_hub
huggingface_hub.utils.disable_progress_bars()  # the hub's off, transformers' own on
summaries = [
    bulkinfer.run(job, output=f"{out}/{k}", task={"response_format": {"type": "json_object"}})
    for k in range(6)
]
print(json.dumps({
    "parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    "bars": transformers.utils.logging.is_progress_bar_enabled(),
    "hub_bars_off": huggingface_hub.utils.are_progress_bars_disabled(),
    "imports_seconds": [s.get("imports_seconds") for s in summaries],
    "views": len(constraints._LL_TOKENIZERS),
    "rows": [s["rows_out"] for s in summaries],
}))
"""


def test_a_notebook_running_jobs_keeps_its_process_as_it_was(tmp_path, tiny_model):
    """Called from someone's program, a run leaves the process as it found it: no environment
    variable set (TOKENIZERS_PARALLELISM=true made forked children that tokenize hang),
    transformers' progress bars as they were, no figure about the process's age (the
    notebook's, not the imports'), and not a tokenizer view kept per structured job."""
    import subprocess
    import sys

    from conftest import child_env

    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(3)),
        tmp_path / "unused",
    )
    env = {k: v for k, v in child_env().items() if k != "TOKENIZERS_PARALLELISM"}
    run = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, str(job), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads(run.stdout.strip().splitlines()[-1])
    assert state["rows"] == [3] * 6
    assert state["parallelism"] is None
    assert state["bars"] is True and state["hub_bars_off"] is True
    assert state["imports_seconds"] == [None] * 6
    assert 1 <= state["views"] <= 4


def test_run_module_inside_a_notebook_kernel_returns_to_it(tmp_path):
    """`%run -m bulkinfer ...` runs the command in the kernel's process: it ends with
    SystemExit, which the kernel catches, not an exit of the whole process."""
    import subprocess
    import sys

    from conftest import child_env

    code = (
        "import sys, types\n"
        "sys.modules['IPython'] = types.ModuleType('IPython')\n"
        "import torch\n"
        "sys.argv = ['bulkinfer', '--version']\n"
        "try:\n"
        "    import runpy; runpy.run_module('bulkinfer', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('kernel still here, exit code', exc.code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "kernel still here, exit code 0" in run.stdout


STOPPED = """
import os, signal, sys, threading, time
import bulkinfer
from bulkinfer.io.layout import OutputLayout

job, out = sys.argv[1], sys.argv[2]
parts = OutputLayout(__import__("pathlib").Path(out)).parts_dir

def stop_after_a_part():
    while not any(parts.glob("*.parquet")) if parts.exists() else True:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop_after_a_part, daemon=True).start()
try:
    bulkinfer.run(job)
except Exception as exc:
    print(type(exc).__name__, exc.exit_code)
print(bulkinfer.run(job)["rows_out"])
"""


def test_a_stop_by_a_signal_says_which_exit_code_the_command_gives(tmp_path, tiny_model):
    import subprocess
    import sys

    from conftest import child_env

    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(40)),
        out,
        checkpoint={"every_rows": 8},
        batching={"max_batch_size": 4},
    )
    env = child_env() | {"BULKINFER_SLOW_BATCH_SECONDS": "0.2"}
    run = subprocess.run(
        [sys.executable, "-c", STOPPED, str(job), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()  # the summary table between
    assert (lines[0], lines[-1]) == ("JobStopped 143", "40"), run.stdout


STOPPED_WHILE_LOADING = """
import gc, os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background shell ignores it)
import bulkinfer, transformers

loader = {}

def ctrl_c_while_loading():
    while not loader:
        found = [t for t in threading.enumerate() if t.name == "bulkinfer-load"]
        loader.update({"id": found[0].ident} if found else {})
        time.sleep(0.01)
    time.sleep(float(sys.argv[2]))  # 0: tokenizing; 1.5: the run waits for the loading
    os.kill(os.getpid(), signal.SIGINT)  # to the process, as a terminal's Ctrl-C

threading.Thread(target=ctrl_c_while_loading, daemon=True).start()
job = {"job": sys.argv[1], "output": sys.argv[3]}
try:
    bulkinfer.run(**job)
except KeyboardInterrupt as exc:
    kept = exc  # as a notebook keeps the last traceback
    running = loader["id"] in sys._current_frames()  # (is_alive() is wrong after a join's Ctrl-C)
    gc.collect()
    models = sum(isinstance(o, transformers.PreTrainedModel) for o in gc.get_objects())
    print("interrupted; still loading:", int(running), "models:", models)
print(bulkinfer.run(**job)["rows_out"])
"""


def test_ctrl_c_while_the_weights_load_leaves_nothing_loading_behind(tmp_path, tiny_model):
    """In a notebook, a Ctrl-C while the weights load waits for the loader before it returns:
    a run started next would otherwise load its weights beside the first's."""
    import subprocess
    import sys

    from conftest import child_env

    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(4)),
        tmp_path / "out",
    )
    env = child_env() | {"BULKINFER_SLOW_LOAD_SECONDS": "3"}
    for delay in ("0", "1.5"):
        run = subprocess.run(
            [sys.executable, "-c", STOPPED_WHILE_LOADING, str(job), delay, str(tmp_path / delay)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.strip().splitlines()
        assert lines[0] == "interrupted; still loading: 0 models: 0", (delay, run.stdout)
        assert lines[-1] == "4", run.stdout
        assert "stopping: waiting for bulkinfer-load to end" in run.stderr


BAD_ROW_WHILE_LOADING = """
import gc, sys
import bulkinfer, transformers

try:
    bulkinfer.run(job=sys.argv[1], output=sys.argv[2])
except bulkinfer.errors.UserError as exc:
    kept = exc  # as a notebook keeps the last traceback
    gc.collect()
    models = sum(isinstance(o, transformers.PreTrainedModel) for o in gc.get_objects())
    print("refused:", type(exc).__name__, "models:", models)
"""


def test_a_bad_row_found_while_the_weights_load_keeps_no_model_behind_its_error(
    tmp_path, tiny_model
):
    """In a notebook, an input error raised while the weights load waits for the loader, then
    lets go of what it loaded: the error's traceback, which the notebook keeps, held the
    model (a second copy of the weights on the GPU beside the next run's)."""
    import subprocess
    import sys

    from conftest import child_env

    rows = write_jsonl(tmp_path / "in.jsonl", sample_prompts(20))
    rows.write_text(rows.read_text() + '{"prompt": "last",,}\n')
    job = write_job(tmp_path / "job.yaml", tiny_model, rows, tmp_path / "out")
    run = subprocess.run(
        [sys.executable, "-c", BAD_ROW_WHILE_LOADING, str(job), str(tmp_path / "out")],
        env=child_env() | {"BULKINFER_SLOW_LOAD_SECONDS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "refused: InputError models: 0", run.stdout


def test_errors_name_the_api_s_arguments_not_the_command_line_s_flags(tmp_path, tiny_model):
    """A folder of another job told a notebook user to "use another --output or pass
    --overwrite": the arguments here are output.path and overwrite=True."""
    from bulkinfer.errors import OutputFolderError

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    bulkinfer.run(job)
    with pytest.raises(OutputFolderError) as refused:
        bulkinfer.run(job, task={"max_new_tokens": 2})
    message = str(refused.value)
    assert "overwrite=True" in message and "--overwrite" not in message, message
    assert "another output.path" in message and "--output" not in message, message
    assert bulkinfer.run(job, task={"max_new_tokens": 2}, overwrite=True)["rows_out"] == 3
    for shard, words in (("5/2", "shard='5/2'"), ("x", "shard='x'"), ((1, 1), "shard='1/1'")):
        with pytest.raises(SpecError) as refused:
            bulkinfer.run(job, output=tmp_path / "sharded", shard=shard)
        assert words in str(refused.value) and "--shard" not in str(refused.value)
    bulkinfer.run(job, output=tmp_path / "sharded", shard="0/2")
    with pytest.raises(OutputFolderError) as refused:
        bulkinfer.run(job, output=tmp_path / "sharded")
    message = str(refused.value)
    assert "shard='I/N'" in message and "--shard" not in message, message


INTERRUPTED_AT = """
import os, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job ignores it)
import bulkinfer

threading.Timer(float(sys.argv[2]), os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    bulkinfer.run(sys.argv[1])
except KeyboardInterrupt:
    print("interrupted")
print(bulkinfer.run(sys.argv[1])["rows_out"])
"""


def test_a_ctrl_c_during_the_first_run_s_imports_leaves_the_next_run_working(tmp_path, tiny_model):
    """A notebook's Ctrl-C that landed inside torch's or transformers' import (the first run in
    a process imports them) left them half made: every later run failed ("cannot import name
    'nn' from partially initialized module 'torch'") or crashed the kernel. One that landed
    before the run had set its handler (bulkinfer's own imports) left numpy's half made."""
    import subprocess
    import sys

    from conftest import child_env

    runs = {}
    for delay in ("0.05", "0.3", "0.6", "1.0"):  # (when imports are under way on this machine)
        job = write_job(
            tmp_path / f"{delay}.yaml",
            tiny_model,
            write_jsonl(tmp_path / "in.jsonl", sample_prompts(4)),
            tmp_path / delay,
        )
        command = [sys.executable, "-c", INTERRUPTED_AT, str(job), delay]
        runs[delay] = subprocess.Popen(
            command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for delay, run in runs.items():
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, (delay, err[-3000:])
        assert out.strip().splitlines()[-1] == "4", (delay, out, err[-2000:])


def test_output_as_a_section_like_the_others(tmp_path, tiny_model):
    """output= is the folder as a path, and the section as a mapping (it was refused:
    "output.path: expected a string, got a mapping")."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    summary = bulkinfer.run(job, output={"path": str(tmp_path / "oai"), "format": "openai"})
    assert summary["rows_out"] == 2 and (tmp_path / "oai" / "responses.jsonl").is_file()
    assert bulkinfer.run(job, output={"format": "openai"})["rows_out"] == 2
    assert (tmp_path / "out" / "responses.jsonl").is_file()


DEFERRED = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job ignores it)
sys.path.insert(0, sys.argv[1])
from bulkinfer.process import interrupts_outside_imports
try:
    with interrupts_outside_imports():
        import interrupting_module  # a Ctrl-C lands inside it
    print("call ended")
except KeyboardInterrupt:
    print("interrupted as the call ended")
try:
    time.sleep(0.5)
    print("nothing later")
except KeyboardInterrupt:
    print("interrupted later")
"""


def test_a_ctrl_c_deferred_past_an_import_ends_that_call_not_a_later_one(tmp_path):
    """A Ctrl-C inside an import is sent again a moment later; where the library call had
    ended by then, it landed in whatever the caller ran next (a next call, an import of its
    own), and the call it was meant for ended as if none had come."""
    import subprocess
    import sys

    from conftest import child_env

    (tmp_path / "interrupting_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.01)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", DEFERRED, str(tmp_path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split("\n")[:2] == ["interrupted as the call ended", "nothing later"], (
        done.stdout + done.stderr
    )
