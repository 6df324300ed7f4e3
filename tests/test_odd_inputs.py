"""Inputs a user's tooling writes that bulkinfer used to misread: ids that appear after the
first rows, hidden folders beside the data, text that is not UTF-8, columns Parquet cannot
store, columns `datasets` keeps as JSON text. Each either runs right or stops in one line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl


def _run(tmp_path, model, inputs, name="out", command="run", **input_section):
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        inputs,
        tmp_path / name,
        task={"max_new_tokens": 2},
        input=input_section,
    )
    return cli(command, str(job))


def _refused(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize("layout", ["first-line", "second-file"])
def test_an_id_after_first_rows_without_one_is_refused_not_replaced(tmp_path, tiny_model, layout):
    """With no id_column the ids are the `id` field of the first row, else row positions: a
    row or file further on that has ids had them silently replaced by positions."""
    if layout == "first-line":
        inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"id": "x", "prompt": "b"}])
        where = "in.jsonl:2 has an 'id' field"
    else:
        (tmp_path / "d").mkdir()
        write_jsonl(tmp_path / "d" / "a.jsonl", [{"prompt": "a"}])
        pq.write_table(pa.table({"id": ["b0"], "prompt": ["b"]}), tmp_path / "d" / "b.parquet")
        inputs, where = tmp_path / "d", "b.parquet has an 'id' column"
    for command in ("validate", "run"):
        _refused(_run(tmp_path, tiny_model, inputs, command=command), where, "input.id_column")
    assert not (tmp_path / "out" / "outputs").exists()


def test_ids_found_past_an_empty_first_file_and_over_long_lines(tmp_path, tiny_model):
    """The id column is looked for in the first file with a row, under the job's own
    max_line_bytes: an empty first part, or first lines longer than 8 MiB with the limit
    raised, lost every id to row positions."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.jsonl").write_text("")
    write_jsonl(
        tmp_path / "d" / "part-1.jsonl", [{"id": "x1", "prompt": "a"}, {"id": "x2", "prompt": "b"}]
    )
    assert _run(tmp_path, tiny_model, tmp_path / "d", command="validate").exit_code == 0
    assert _run(tmp_path, tiny_model, tmp_path / "d").exit_code == 0
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == ["x1", "x2"]

    long_rows = [{"id": f"L{i}", "prompt": f"hi {i}", "doc": "x" * (9 * 2**20)} for i in range(2)]
    write_jsonl(tmp_path / "long.jsonl", long_rows)
    result = _run(tmp_path, tiny_model, tmp_path / "long.jsonl", "long", max_line_bytes=2**25)
    assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "long").column("id").to_pylist() == ["L0", "L1"]


def test_an_empty_parquet_file_beside_others_is_passed_over(tmp_path, tiny_model):
    """A writer's Parquet part with no rows has a schema all the same, often not the job's:
    its columns decided the ids (positions where the next file has an 'id', refused) and its
    missing kept column was refused, though an empty file is passed over."""
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "d" / "a.parquet")
    pq.write_table(
        pa.table({"id": ["x", "y"], "prompt": ["one", "two"], "k": [1, 2]}),
        tmp_path / "d" / "b.parquet",
    )
    for command in ("validate", "run"):
        result = _run(tmp_path, tiny_model, tmp_path / "d", command=command, keep_columns=["k"])
        assert result.exit_code == 0, result.output
    got = read_outputs(tmp_path / "out")
    assert got.column("id").to_pylist() == ["x", "y"] and got.column("k").to_pylist() == [1, 2]


def test_hidden_and_underscore_folders_are_passed_over(tmp_path, tiny_model):
    """A notebook's .ipynb_checkpoints copy and a writer's _temporary part doubled rows."""
    rows = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "rows.jsonl", rows)
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir()
    write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "rows-checkpoint.jsonl", rows)
    (tmp_path / "d" / "_temporary" / "0").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "_temporary" / "0" / "part.jsonl", [{"id": "c", "prompt": "x"}])
    assert _run(tmp_path, tiny_model, tmp_path / "d").exit_code == 0
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == ["a", "b"]


def test_files_of_other_kinds_in_an_input_folder_are_named_not_dropped_unseen(tmp_path, tiny_model):
    """A .csv beside the JSONL and Parquet files of a folder: its rows are not read (CSV needs
    input.format: hf), and a warning says so, with the notes.txt; a writer's _SUCCESS is not
    named."""
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": "a", "prompt": "one"}])
    pq.write_table(pa.table({"id": ["b"], "prompt": ["two"]}), folder / "b.parquet")
    (folder / "c.csv").write_text("id,prompt\nc,three\n")
    (folder / "notes.txt").write_text("where these came from\n")
    (folder / "_SUCCESS").write_text("")
    for command in ("validate", "run"):
        result = _run(tmp_path, tiny_model, folder, command=command)
        assert result.exit_code == 0, result.output
        warning = [line for line in result.output.splitlines() if "not read" in line]
        assert len(warning) == 1, result.output
        assert (
            "c.csv" in warning[0] and "notes.txt" in warning[0] and "input.format: hf" in warning[0]
        )
        assert "_SUCCESS" not in result.output
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == ["a", "b"]


def test_inputs_that_cannot_be_stored_or_read_stop_in_one_line(tmp_path, tiny_model):
    # a Parquet file with no rows: validate said OK, run then refused it
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}),
        tmp_path / "zero.parquet",
    )
    for command in ("validate", "run"):
        _refused(
            _run(tmp_path, tiny_model, tmp_path / "zero.parquet", command=command),
            "the input has no rows",
        )

    # a keep column of empty objects: Parquet has no struct of no fields (a traceback)
    rows = [{"id": "a", "prompt": "hi", "meta": {}}, {"id": "b", "prompt": "yo", "meta": {"x": {}}}]
    write_jsonl(tmp_path / "meta.jsonl", rows)
    _refused(
        _run(tmp_path, tiny_model, tmp_path / "meta.jsonl", keep_columns=["meta"]),
        "meta.jsonl:1: keep column 'meta' has objects without fields",
    )

    # strings that are not UTF-8, as a writer that does not check them leaves (a traceback)
    data, offsets = b"hellowor\xffld", pa.array([0, 5, 11], pa.int32()).buffers()[1]
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": text}), tmp_path / "bad.parquet")
    for command in ("validate", "run"):
        _refused(
            _run(tmp_path, tiny_model, tmp_path / "bad.parquet", command=command),
            "bad.parquet: row 1: column 'prompt' is not valid UTF-8",
        )


def test_a_column_datasets_keeps_as_json_text_is_refused(tmp_path, tiny_model):
    """`datasets` stores a column of mixed value types as JSON text: its prompts were run with
    their quotes, a number as text, the ids quoted."""
    pytest.importorskip("datasets")
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"id": "a", "prompt": "hello world"}, {"id": "c", "prompt": 7}]
        )
    )
    _refused(
        _run(tmp_path, tiny_model, path, format="hf"),
        "mixed.jsonl: column 'prompt' is extension<arrow.json>",
    )
    # inside a column: a message's content, a string in one row and text parts in another,
    # reached the chat template as JSON text with its quotes (read through datasets, or from
    # the Parquet file datasets writes)
    messages = [
        {"id": "a", "messages": [{"role": "user", "content": "hello"}]},
        {"id": "b", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    ]
    path = write_jsonl(tmp_path / "parts.jsonl", messages)
    field = "field 'messages[].content' is extension<arrow.json>"
    _refused(_run(tmp_path, tiny_model, path, format="hf", prompt_column="messages"), field)
    content = pa.array(['"hello"', '[{"type": "text", "text": "hi"}]'], pa.json_(pa.string()))
    turns = pa.StructArray.from_arrays([pa.array(["user", "user"]), content], ["role", "content"])
    offsets = pa.array([0, 1, 2], pa.int32())
    column = pa.ListArray.from_arrays(offsets, turns)
    pq.write_table(pa.table({"id": ["a", "b"], "messages": column}), tmp_path / "parts.parquet")
    _refused(
        _run(tmp_path, tiny_model, tmp_path / "parts.parquet", prompt_column="messages"), field
    )


def test_kept_columns_of_arrow_extension_types_pass_through(tmp_path, tiny_model):
    """A kept column is not read, only carried: a uuid column, JSON text or a tensor column
    comes out as it went in (they were refused as `datasets`' JSON text, which matters only
    in the columns bulkinfer reads)."""
    uuids = pa.array([bytes([i]) * 16 for i in range(2)], pa.binary(16)).cast(pa.uuid())
    json_text = pa.array(['{"a": 1}', "[2]"], pa.json_(pa.string()))
    table = pa.table({"id": ["a", "b"], "prompt": ["one", "two"], "u": uuids, "j": json_text})
    pq.write_table(table, tmp_path / "ext.parquet")
    result = _run(tmp_path, tiny_model, tmp_path / "ext.parquet", keep_columns=["u", "j"])
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out")
    for name in ("u", "j"):
        assert out.schema.field(name).type == table.schema.field(name).type
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
    # a uuid id (as DuckDB and Spark write them) is not datasets' JSON text: said so
    pq.write_table(table.set_column(0, "id", uuids), tmp_path / "uuid-id.parquet")
    result = _run(tmp_path, tiny_model, tmp_path / "uuid-id.parquet", "uuid")
    _refused(result, "column 'id' is extension<arrow.uuid>", "cast it to strings")
    assert "JSON text" not in result.output


def test_a_byte_order_mark_alone_on_the_first_line_and_twice_named_columns(tmp_path, tiny_model):
    """A BOM then a blank line was 'not valid JSON' (other blank lines are passed over); a
    Parquet file with two columns of one name gave a KeyError traceback."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\r\n{"id": "a", "prompt": "hi"}\n')
    assert _run(tmp_path, tiny_model, path).exit_code == 0
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == ["a"]
    columns = [pa.array(["a"]), pa.array(["x"]), pa.array(["y"])]
    twice = pa.Table.from_arrays(columns, names=["id", "prompt", "prompt"])
    pq.write_table(twice, tmp_path / "twice.parquet")
    for command in ("validate", "run"):
        _refused(
            _run(tmp_path, tiny_model, tmp_path / "twice.parquet", "twice", command=command),
            "twice.parquet: 2 columns are named 'prompt'; rename all but one",
        )


def test_parquet_files_that_encode_a_column_differently_run_together(tmp_path, tiny_model):
    """One file's column dictionary-encoded (pandas' categoricals), another's plain; string
    beside large_string; int32 beside int64: the rows of both files reach the outputs, each
    column in one plain type (a dictionary column beside a plain one was refused)."""
    (tmp_path / "d").mkdir()
    first = {
        "id": pa.array(["a", "b"]).dictionary_encode(),
        "prompt": pa.array(["a b", "c d"], pa.large_string()),
        "source": pa.array(["x", "y"]).dictionary_encode(),
        "n": pa.array([1, 2], pa.int32()),
    }
    second = {"id": ["c"], "prompt": ["e f"], "source": ["z"], "n": pa.array([3], pa.int64())}
    pq.write_table(pa.table(first), tmp_path / "d" / "a.parquet")
    pq.write_table(pa.table(second), tmp_path / "d" / "b.parquet")
    result = _run(tmp_path, tiny_model, tmp_path / "d", keep_columns=["source", "n"])
    assert result.exit_code == 0, result.output
    table = read_outputs(tmp_path / "out")
    assert table.schema.field("source").type == pa.string()
    rows = sorted(table.select(["id", "source", "n"]).to_pylist(), key=lambda r: r["id"])
    assert rows == [
        {"id": "a", "source": "x", "n": 1},
        {"id": "b", "source": "y", "n": 2},
        {"id": "c", "source": "z", "n": 3},
    ]


def test_status_says_a_run_that_failed_failed(tmp_path, tiny_model):
    """A run that stops on an error after opening its folder (an input with no rows is found
    only when read) left a folder `status` showed as pending; it says failed, and why, and a
    run with the input fixed goes on in the same folder."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("")
    _refused(_run(tmp_path, tiny_model, inputs), "the input has no rows")
    status = cli("status", str(tmp_path / "out"))
    assert status.exit_code == 0, status.output
    assert "failed" in status.output and "the input has no rows" in status.output, status.output
    write_jsonl(inputs, [{"id": "a", "prompt": "one"}])
    assert _run(tmp_path, tiny_model, inputs).exit_code == 0
    status = cli("status", str(tmp_path / "out"))
    assert "done" in status.output and "failed" not in status.output, status.output


def test_a_model_folder_whose_name_looks_like_a_glob_runs(tmp_path, tiny_model):
    """The check for weights and tokenizer files read the folder's path as a pattern: a model
    in `tiny[v1]` had 'no weights' and was refused by validate and run."""
    import shutil

    model = tmp_path / "models" / "tiny[v1]"
    shutil.copytree(tiny_model, model)
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hello"}])
    for command in ("validate", "run"):
        result = _run(tmp_path, model, inputs, command=command)
        assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == ["a"]


def test_the_output_id_keeps_the_input_files_id_type(tmp_path, tiny_model):
    """Outputs join back to their input: an id column of int32 or large_string (polars writes
    strings so) comes out of that type; files that disagree (int32 beside int64) still run,
    their ids as int64."""
    prompts = [r["prompt"] for r in sample_prompts(6)]
    cases = {
        "int32": [pa.array(range(6), pa.int32())],
        "uint16": [pa.array(range(6), pa.uint16())],
        "large_string": [pa.array([f"é{i}" for i in range(6)], pa.large_string())],
        "mixed": [pa.array(range(3), pa.int32()), pa.array(range(3, 6), pa.int64())],
    }
    for name, arrays in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        at = 0
        for k, ids in enumerate(arrays):
            rows = prompts[at : at + len(ids)]
            pq.write_table(pa.table({"id": ids, "prompt": rows}), folder / f"in-{k}.parquet")
            at += len(ids)
        out = tmp_path / f"out-{name}"
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            str(folder / "*.parquet"),
            out,
            task={"type": "score"},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        table = read_outputs(out)
        expected = pa.int64() if name == "mixed" else arrays[0].type
        assert table.schema.field("id").type == expected, name
        schema = pa.schema([("id", expected), ("prompt", pa.string())])
        files = sorted(folder.glob("*.parquet"))
        inputs = pa.concat_tables(pq.read_table(f).cast(schema) for f in files)
        joined = inputs.join(table.select(["id", "logprob_sum"]), "id")
        assert joined.num_rows == 6 and joined.column("logprob_sum").null_count == 0, name


def test_a_kept_column_named_as_an_output_column_but_for_case_is_warned_of(tmp_path, tiny_model):
    """`Text` beside the output's `text` runs (the names differ), with a warning: DuckDB
    renames one of them and Spark, ignoring case, refuses the file's columns as ambiguous."""
    rows = [{"id": "a", "prompt": "one", "Text": "kept"}]
    result = _run(
        tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), keep_columns=["Text"]
    )
    assert result.exit_code == 0, result.output
    assert "'Text' differs from the output column 'text' only in case" in result.output
    out = read_outputs(tmp_path / "out")
    assert out.column("Text").to_pylist() == ["kept"] and "text" in out.column_names


def test_status_counts_rows_refused_when_read_as_settled(tmp_path, tiny_model):
    """Rows refused as they are read (null prompts) are written only with the outputs: status
    of a run stopped after every other row committed said 17 of 20 rows done, and counted the
    three as work left in its ETA."""
    import signal
    import subprocess
    import sys

    from conftest import child_env

    rows = [
        {"id": f"r{i}", "prompt": None if i % 7 == 3 else f"row {i} says hello"} for i in range(20)
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        batching={"max_batch_size": 1},
        checkpoint={"every_rows": 1},
    )
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:17"}
    killed = subprocess.run([sys.executable, "-m", "bulkinfer", "run", str(job)], env=env)
    assert killed.returncode == -signal.SIGKILL
    status = cli("status", str(tmp_path / "out"))
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[1].split()[1:5] == ["stopped", "20", "/", "20"], status.output
    assert cli("run", str(job)).exit_code == 0
    status = cli("status", str(tmp_path / "out"))
    assert status.output.splitlines()[1].split()[1:5] == ["done", "20", "/", "20"], status.output
    assert len(read_outputs(tmp_path / "out")) == 20
