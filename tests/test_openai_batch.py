"""OpenAI Batch API files: a request file runs unchanged and yields the matching response file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import cli, cli_subprocess, read_outputs, sample_prompts, write_job, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from bulkinfer.engines.stops import truncate_at_stop

TOPICS = ["the fox", "Paris", "東京 😀", "Émilie reads news", "def add(a, b):", "1 2 3"]


def _chat_request(i: int, **body) -> dict:
    return {
        "custom_id": f"request-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})"},
            ],
            "max_tokens": 1 + i % 5,
            **body,
        },
    }


def _run(tmp_path, model, requests, name="out", **task):
    batch = tmp_path / f"{name}.jsonl"  # non-ASCII as \u escapes: a lone surrogate too
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="ascii")
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        batch,
        tmp_path / name,
        task={"max_new_tokens": 8, **task},
        batching={"max_tokens": 2000, "max_batch_size": 16},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    lines = (tmp_path / name / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_hundred_chat_requests_give_hundred_responses_keyed_by_custom_id(tmp_path, tiny_model):
    requests = [_chat_request(i) for i in range(100)]
    responses = _run(tmp_path, tiny_model, requests)
    assert len(responses) == 100
    assert [r["custom_id"] for r in responses] == [r["custom_id"] for r in requests]
    assert len({r["id"] for r in responses}) == 100
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    outputs = read_outputs(tmp_path / "out").to_pylist()
    for request, response, row in zip(requests, responses, outputs, strict=True):
        assert response["error"] is None
        assert response["response"]["status_code"] == 200
        body = response["response"]["body"]
        assert body["object"] == "chat.completion"
        assert [c["index"] for c in body["choices"]] == [0]
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == row["text"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["logprobs"] is None
        usage = body["usage"]
        rendered = tokenizer.apply_chat_template(
            request["body"]["messages"], tokenize=False, add_generation_prompt=True
        )
        assert usage["prompt_tokens"] == len(
            tokenizer(rendered, add_special_tokens=False).input_ids
        )
        assert 0 < usage["completion_tokens"] <= request["body"]["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_line_separators_in_a_request_stay_inside_its_response_line(tmp_path, tiny_model):
    """U+2028 and U+2029 are escaped in the response file (JSON either way): split on Unicode
    line breaks, as str.splitlines and JavaScript do, it is still one line a request."""
    requests = [_chat_request(i) | {"custom_id": f"id\u2028{i}\u2029"} for i in range(3)]
    requests[1]["body"]["messages"][1]["content"] = "first\u2028second\u2029third"
    responses = _run(tmp_path, tiny_model, requests)
    assert [r["custom_id"] for r in responses] == [r["custom_id"] for r in requests]


def test_per_request_settings_match_the_same_settings_as_a_job(tmp_path, tiny_model):
    """A request's temperature, seed, n, stop and max_tokens give what a job with those settings
    gives for the same messages."""
    messages = [{"role": "user", "content": "the quick brown fox"}]
    settings = [
        {"temperature": 0.0, "max_tokens": 6},
        {"temperature": 1.0, "seed": 11, "n": 3, "max_completion_tokens": 5},
        {"temperature": 0.9, "top_p": 0.5, "seed": 2, "max_tokens": 7, "stop": ["o"]},
        {"temperature": 1.2, "seed": 5, "max_tokens": 4, "logprobs": True},
    ]
    requests = [
        {
            "custom_id": f"r{k}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "x", "messages": messages, **s},
        }
        for k, s in enumerate(settings)
    ]
    responses = _run(tmp_path, tiny_model, requests, max_new_tokens=8)
    for k, (s, response) in enumerate(zip(settings, responses, strict=True)):
        task = {
            "temperature": s["temperature"],
            "top_p": s.get("top_p", 1.0),
            "seed": s.get("seed", 0),
            "n": s.get("n", 1),
            "max_new_tokens": s.get("max_tokens", s.get("max_completion_tokens")),
            "stop": s.get("stop", []),
            "logprobs": s.get("logprobs", False),
        }
        # The same request as row k of a plain job: keys are per (seed, row, sample).
        rows = [{"id": f"pad{j}", "prompt": "x"} for j in range(k)]
        rows.append({"id": "it", "prompt": messages})
        job = write_job(
            tmp_path / f"job{k}.yaml",
            tiny_model,
            write_jsonl(tmp_path / f"plain{k}.jsonl", rows),
            tmp_path / f"plain{k}",
            task=task,
        )
        assert cli("run", str(job)).exit_code == 0
        expected = read_outputs(tmp_path / f"plain{k}").to_pylist()[-1]
        texts = expected["text"] if task["n"] > 1 else [expected["text"]]
        got = [c["message"]["content"] for c in response["response"]["body"]["choices"]]
        assert got == texts, s
        if s.get("logprobs"):
            content = response["response"]["body"]["choices"][0]["logprobs"]["content"]
            assert [c["logprob"] for c in content] == pytest.approx(
                expected["token_logprobs"], abs=1e-5
            )
        if "stop" in s:
            assert all("o" not in t for t in got)


def test_completions_requests_and_bad_requests(tmp_path, tiny_model):
    requests = [
        {
            "custom_id": "completion",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "x", "prompt": "The quick brown", "max_tokens": 5, "logprobs": 0},
        },
        _chat_request(1, presence_penalty=0, user="someone", response_format={"type": "text"}),
        _chat_request(2, tools=[{"type": "function", "function": {"name": "f"}}]),
        _chat_request(3, top_logprobs=21, logprobs=True),
        {"custom_id": "image", "method": "POST", "url": "/v1/images/generations", "body": {}},
        _chat_request(5, temperature=7),
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        _chat_request(7, temperature=float("nan")),  # Python's json reads NaN
        _chat_request(8, seed=2**70),  # beyond 64 bits: one request's error, not the job's
        _chat_request(9, max_tokens=1e300),
        _chat_request(
            10,
            response_format={
                "type": "json_schema",
                "json_schema": {"schema": {"type": "string", "const": "a\ud800"}},
            },
        ),
        _chat_request(11, max_completion_tokens=4),  # both limits, differing: which one?
        _chat_request(12, max_completion_tokens=1 + 12 % 5),  # both, equal: fine
        {**_chat_request(13), "body": {"messages": [{"role": "robot", "content": "hi"}]}},
        {
            **_chat_request(14),
            "body": {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        },
        {
            **_chat_request(15),
            "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        },
        # the other endpoint's prompt field: not answered, so refused (it was left out)
        {**_chat_request(16), "body": {**_chat_request(16)["body"], "prompt": "ignored?"}},
        {
            "custom_id": "completion-with-messages",
            "url": "/v1/completions",
            "body": {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        },
    ]
    responses = _run(tmp_path, tiny_model, requests, chat_template="never")
    by_id = {r["custom_id"]: r for r in responses}
    assert list(by_id) == [r["custom_id"] for r in requests]
    completion = by_id["completion"]["response"]["body"]
    assert completion["object"] == "text_completion"
    choice = completion["choices"][0]
    logprobs = choice["logprobs"]
    assert (
        len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
    )
    # logprobs: 0 gives the sampled token's log-prob alone at each position (it was null)
    assert logprobs["top_logprobs"] == [
        {t: v} for t, v in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    ]
    # A completions prompt is raw text: the same as greedy transformers on the plain prompt.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = tokenizer("The quick brown", return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = tokenizer.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert choice["text"] == truncate_at_stop(text, ())[0]
    assert by_id["request-1"]["error"] is None  # neutral values of unsupported fields are fine
    assert by_id["request-12"]["error"] is None
    for custom_id, fragment in [
        ("request-2", "body.tools"),
        ("request-3", "body.top_logprobs"),
        ("image", "/v1/images/generations"),
        ("request-5", "body.temperature"),
        ("no-messages", "no 'messages'"),
        ("request-7", "body.temperature is NaN"),
        ("request-8", "body.seed"),
        ("request-9", "body.max_tokens"),
        ("request-10", "body.response_format is not valid Unicode: a lone surrogate"),
        ("request-11", "body.max_tokens and body.max_completion_tokens differ (2 and 4); give one"),
        ("request-13", 'body.messages[0].role is "robot", expected one of system, developer'),
        ("request-14", "body.messages[0].content[0].text is null, expected a string"),
        ("request-15", "body.messages[0].content[0].text is 5, expected a string"),
        ("request-16", "body.prompt"),
        ("completion-with-messages", "body.messages"),
    ]:
        line = by_id[custom_id]
        assert line["response"]["status_code"] == 400, custom_id
        assert fragment in line["error"]["message"], (custom_id, line["error"])
        assert line["response"]["body"]["error"]["message"] == line["error"]["message"]


def test_missing_custom_id_is_one_line(tmp_path, tiny_model):
    requests = [_chat_request(0), {"method": "POST", "custom_id": "", "body": {}}]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "batch.jsonl", requests),
        tmp_path / "out",
    )
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "batch.jsonl:2" in result.output and "custom_id" in result.output


def test_a_keep_column_no_request_has_is_refused_as_validate_refuses_it(tmp_path, tiny_model):
    """A job file's keep_columns (`[source]`, as the sample job's) pointed at a batch file:
    run wrote the column all nulls, while validate refused it."""
    requests = [_chat_request(i) for i in range(3)]
    requests[1]["team"] = "search"  # a request line's own field can be kept
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "batch.jsonl", requests),
        tmp_path / "out",
        input={"keep_columns": ["source"]},
    )
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        assert "no row has the keep column 'source'" in result.output, result.output
    assert not (tmp_path / "out" / "outputs").exists()
    result = cli("run", str(job), "--set", "input.keep_columns=[team]")
    assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "out").column("team").to_pylist() == [None, "search", None]


def test_sharded_run_writes_the_responses_once_after_the_merge(tmp_path, tiny_model):
    requests = [_chat_request(i, temperature=0.9, seed=i, n=1 + i % 2) for i in range(12)]
    single = _run(tmp_path, tiny_model, requests, name="single")
    job = write_job(
        tmp_path / "sharded.yaml",
        tiny_model,
        tmp_path / "single.jsonl",
        tmp_path / "sharded",
        task={"max_new_tokens": 8},
        batching={"max_tokens": 2000, "max_batch_size": 16},
    )
    result = cli_subprocess("run", str(job), "--gpus", "2")
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "sharded" / "shards").glob("*/responses.jsonl"))
    lines = (tmp_path / "sharded" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    merged = [json.loads(line) for line in lines]
    for a, b in zip(single, merged, strict=True):
        a["response"]["body"].pop("created")
        b["response"]["body"].pop("created")
        assert a == b


def test_requests_once_crashing_or_misread(tmp_path, tiny_model):
    """A lone surrogate in `stop` or an embeddings input (a traceback, the job lost), a top_p
    below float32's least (every token id 0) and max_tokens of 2**63-1 (wrapped negative
    through float64) are each one request's business, answered as such."""
    schema = {
        "type": "object",
        "properties": {"zeta": {"enum": [1, 2]}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    ordered = {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    embed = {"custom_id": "", "url": "/v1/embeddings", "body": {"input": ""}}
    requests = [
        _chat_request(0, stop="\udc00"),
        {**embed, "custom_id": "surrogate-input", "body": {"input": "x\ud800"}},
        {**embed, "custom_id": "long-input", "body": {"input": "Paris " * 600}},
        _chat_request(3, max_tokens=8),
        _chat_request(3, max_tokens=8, temperature=1.0, top_p=1e-100),
        _chat_request(5, max_tokens=2**63 - 1),
        _chat_request(6, max_tokens=64, response_format=ordered),
    ]
    for i, request in enumerate(requests):
        if request["url"] != "/v1/embeddings":
            request["custom_id"] = f"r{i}"
    path = tmp_path / "in.jsonl"  # ASCII JSON: the surrogates as \u escapes, as clients write them
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    task = {"max_new_tokens": 64}
    job = write_job(tmp_path / "job.yaml", tiny_model, path, tmp_path / "out", task=task)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
    by_id = {r["custom_id"]: r for r in map(json.loads, lines)}
    for custom_id, fragment in [
        ("r0", "body.stop is not valid Unicode: a lone surrogate '\\udc00'"),
        ("surrogate-input", "body.input[0] is not valid Unicode"),
        ("long-input", "embeddings input has"),
    ]:
        assert by_id[custom_id]["response"]["status_code"] == 400
        assert fragment in by_id[custom_id]["error"]["message"], by_id[custom_id]["error"]
    assert "generate" not in by_id["long-input"]["error"]["message"]
    greedy, tiny_top_p = (by_id[f"r{i}"]["response"]["body"]["choices"][0] for i in (3, 4))
    assert tiny_top_p["message"]["content"] == greedy["message"]["content"]
    assert by_id["r5"]["response"]["body"]["usage"]["completion_tokens"] <= 64
    kept = by_id["r6"]["response"]["body"]["choices"][0]
    assert kept["finish_reason"] == "stop", kept
    assert list(json.loads(kept["message"]["content"])) == ["zeta", "alpha"]


def test_the_plan_of_requests_asking_for_2_63_tokens(tmp_path, tiny_model):
    """max_tokens 2**63-1 plans as any number over task.max_new_tokens does: the job's limit."""
    plans = []
    for asked in (10**9, 2**63 - 1):
        requests = [_chat_request(i, max_tokens=asked) for i in range(16)]
        job = write_job(
            tmp_path / f"{asked}.yaml",
            tiny_model,
            write_jsonl(tmp_path / f"{asked}.jsonl", requests),
            tmp_path / f"out{asked}",
            task={"max_new_tokens": 32},
            batching={"max_tokens": 300},
        )
        proc = cli_subprocess("plan", str(job), "--json")
        assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr
        plans.append(json.loads(proc.stdout)["batch_rows"])
    assert plans[0] == plans[1] and len(plans[0]) > 1


def test_validate_finds_what_run_refuses_in_the_first_requests(tmp_path, tiny_model):
    """Repeated custom_ids, and a bad request under on_error: fail, refused by validate as
    run refuses them; an OpenAI file's requests are counted."""

    def validate(name, requests, *settings):
        inputs = write_jsonl(tmp_path / f"{name}.jsonl", requests)
        job = write_job(tmp_path / f"{name}.yaml", tiny_model, inputs, tmp_path / name)
        return cli("validate", str(job), *settings)

    good = validate("good", [_chat_request(i) for i in range(3)])
    assert good.exit_code == 0 and "3 rows" in good.output, good.output
    twice = validate("twice", [_chat_request(0), _chat_request(1), _chat_request(0)])
    assert twice.exit_code == 2
    assert "duplicate id 'request-0' at" in twice.output and "twice.jsonl:3" in twice.output
    bad = [_chat_request(0), _chat_request(1, max_tokens=0)]
    assert validate("recorded", bad).exit_code == 0
    failing = validate("failing", bad, "--set", "on_error=fail")
    assert failing.exit_code == 2
    assert "failing.jsonl:2: invalid request: body.max_tokens" in failing.output, failing.output


def test_a_request_s_own_plain_text_and_no_logprobs_win_over_the_job_s(tmp_path, tiny_model):
    """A job keeping its rows to a format and giving alternatives: a request asking for plain
    text gets the free text (the same as a job without the format), one saying `logprobs:
    false` gets none, a completions request's `logprobs: 0` gets no alternatives (its map at
    each position holds the sampled token alone, as OpenAI's does); and a first
    line without its body is a 400 row of a batch file, not a prompt file's bad line."""
    no_body = {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}
    requests = [
        no_body,
        _chat_request(1, temperature=0, max_tokens=8),
        _chat_request(2, temperature=0, max_tokens=8, response_format={"type": "text"}),
        _chat_request(3, temperature=0, max_tokens=8, logprobs=False),
        {
            "custom_id": "completion",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "The quick brown", "max_tokens": 3, "logprobs": 0},
        },
    ]
    kept = {"type": "choice", "choices": ["alpha", "beta"]}
    task = {"chat_template": "never", "top_logprobs": 2}
    by_id = {
        r["custom_id"]: r
        for r in _run(tmp_path, tiny_model, requests, response_format=kept, **task)
    }
    free = {r["custom_id"]: r for r in _run(tmp_path, tiny_model, requests[1:3], "free", **task)}
    assert by_id["no-body"]["response"]["status_code"] == 400
    assert "body is not an object" in by_id["no-body"]["error"]["message"]

    def choice(line):
        return line["response"]["body"]["choices"][0]

    assert choice(by_id["request-1"])["message"]["content"] in ("alpha", "beta")
    assert choice(by_id["request-2"])["message"] == choice(free["request-2"])["message"]
    assert choice(by_id["request-1"])["logprobs"]["content"][0]["top_logprobs"]
    assert choice(by_id["request-3"])["logprobs"] is None
    tokens = choice(by_id["completion"])["logprobs"]  # the sampled token's alone, no others
    assert tokens["token_logprobs"] and all(len(top) == 1 for top in tokens["top_logprobs"])


def test_chat_logprob_bytes_rebuild_the_text_where_tokens_split_a_character(tmp_path, tiny_model):
    """A token that is part of a character decodes to U+FFFD on its own: its `bytes` are its
    own (they were U+FFFD's), so the bytes of a choice's tokens, joined, are its text, also in
    a sharded run whose merge writes the responses."""
    requests = [
        _chat_request(i, temperature=1.0, seed=i, max_tokens=40, logprobs=True, top_logprobs=2)
        for i in range(8)
    ]
    specials = AutoTokenizer.from_pretrained(tiny_model).all_special_tokens
    for name, args in (("single", []), ("sharded", ["--gpus", "2"])):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            write_jsonl(tmp_path / "requests.jsonl", requests),
            tmp_path / name,
            task={"max_new_tokens": 40, "chat_template": "never"},
        )
        result = cli("run", str(job), *args)
        assert result.exit_code == 0, result.output
        split = 0
        for line in (tmp_path / name / "responses.jsonl").read_text().splitlines():
            choice = json.loads(line)["response"]["body"]["choices"][0]
            content = choice["logprobs"]["content"]
            joined = b"".join(bytes(t["bytes"]) for t in content).decode(errors="replace")
            for special in specials:  # tokens the text leaves out
                joined = joined.replace(special, "")
            # bytes no character completes: one U+FFFD or several, as the decoder counts them
            assert _one_fffd(joined) == _one_fffd(choice["message"]["content"])
            split += sum("\ufffd" in t["token"] for t in content)
            for t in content:  # alternatives too: each one's bytes, not U+FFFD's
                for alt in t["top_logprobs"]:
                    assert bytes(alt["bytes"]) != "\ufffd".encode() or alt["token"] != "\ufffd"
        assert split, "no token split a character: the test did not test it"


def _one_fffd(text: str) -> str:
    return re.sub("\ufffd+", "\ufffd", text)


def test_completions_logprobs_name_byte_pieces_and_list_the_likeliest_first(tmp_path, tiny_model):
    """The legacy completions shape: a token that is part of a character is `bytes:\\xNN..`
    (it was U+FFFD, and the tokens did not join back into the text), `text_offset` says where
    each token starts in the text, and each `top_logprobs` map lists the likeliest first."""
    requests = [
        {
            "custom_id": f"c{i}",
            "url": "/v1/completions",
            "body": {
                "prompt": "The quick brown",
                "max_tokens": 40,
                "temperature": 1.0,
                "seed": i,
                "logprobs": 3,
            },
        }
        for i in range(8)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    split = 0
    for line in _run(tmp_path, tiny_model, requests, max_new_tokens=40):
        choice = line["response"]["body"]["choices"][0]
        logprobs, text = choice["logprobs"], choice["text"]
        pieces = [
            bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
            for t in logprobs["tokens"]
        ]
        joined = b"".join(pieces).decode(errors="replace")
        for special in specials:  # tokens the text leaves out
            joined = joined.replace(special, "")
        assert _one_fffd(joined) == _one_fffd(text)
        split += sum(t.startswith("bytes:") for t in logprobs["tokens"])
        assert not any("\ufffd" in t for t in logprobs["tokens"])
        offsets = logprobs["text_offset"]
        assert offsets == sorted(offsets) and offsets[0] == 0
        for token, offset in zip(logprobs["tokens"], offsets, strict=True):
            if not token.startswith("bytes:") and token not in specials:
                assert text[offset : offset + len(token)] == token
        for top, token, value in zip(
            logprobs["top_logprobs"], logprobs["tokens"], logprobs["token_logprobs"], strict=True
        ):
            values = list(top.values())
            assert values == sorted(values, reverse=True), top
            # the sampled token too ("up to logprobs+1 elements"), where the top 3 leave it out
            assert top[token] == value and len(top) <= 4, (top, token, value)
    assert split, "no token split a character: the test did not test it"


def test_a_request_for_several_greedy_samples_is_warned_of(tmp_path, tiny_model):
    """A request without `temperature` takes the job's (0), not the API's default of 1, so its
    n samples are equal: the run says so (it did not)."""
    requests = [_chat_request(0, n=3), _chat_request(1, n=3, temperature=0.8), _chat_request(2)]
    batch = write_jsonl(tmp_path / "batch.jsonl", requests)
    job = write_job(tmp_path / "job.yaml", tiny_model, batch, tmp_path / "out")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "1 request asks for n > 1 samples at temperature 0" in result.output, result.output
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    texts = [c["message"]["content"] for c in lines[0]["response"]["body"]["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1
    first = {k: v for k, v in _chat_request(5).items() if k != "custom_id"}
    job = write_job(
        tmp_path / "noid.yaml",
        tiny_model,
        write_jsonl(tmp_path / "noid.jsonl", [first, _chat_request(6)]),
        tmp_path / "noid",
    )
    result = cli("run", str(job))  # a batch file, its first line without its custom_id
    assert result.exit_code == 2 and "noid.jsonl:1: custom_id" in result.output, result.output


def test_responses_asked_of_a_job_that_finished_without_them(tmp_path, tiny_model):
    """`output.format: openai` on a job finished with `parquet` said 'nothing to do' and wrote
    no responses.jsonl; it now writes them from the finished outputs, as a run would have."""
    requests = [_chat_request(i) for i in range(6)]
    want = _run(tmp_path, tiny_model, requests, name="auto")
    batch = tmp_path / "auto.jsonl"
    job = write_job(
        tmp_path / "late.yaml",
        tiny_model,
        batch,
        tmp_path / "late",
        task={"max_new_tokens": 8},
        batching={"max_tokens": 2000, "max_batch_size": 16},
    )
    assert cli("run", str(job), "--set", "output.format=parquet").exit_code == 0
    assert not (tmp_path / "late" / "responses.jsonl").exists()
    result = cli("run", str(job), "--set", "output.format=openai")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "late" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    got = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in got] == [r["custom_id"] for r in requests]
    bodies = [[c["message"] for c in r["response"]["body"]["choices"]] for r in got]
    assert bodies == [[c["message"] for c in r["response"]["body"]["choices"]] for r in want]
    again = cli("run", str(job), "--set", "output.format=openai")
    assert "already finished" in again.output


@pytest.mark.parametrize("top", [0, 2])
def test_plain_prompts_with_logprobs_give_openai_responses(tmp_path, tiny_model, top):
    """output.format: openai on a plain prompt file with task.logprobs and one sample a row:
    writing the responses failed on every run (a sample's token ids were not made a list of
    one), so the job could never finish. Each choice now carries a log-prob a token."""
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(5)),
        tmp_path / "out",
        task={"max_new_tokens": 6, "logprobs": True, "top_logprobs": top},
    )
    result = cli("run", str(job), "--set", "output.format=openai")
    assert result.exit_code == 0, result.output
    outputs = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    lines = (tmp_path / "out" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    for line in map(json.loads, lines):
        (choice,) = line["response"]["body"]["choices"]
        content = choice["logprobs"]["content"]
        want = outputs[line["custom_id"]]
        assert [t["logprob"] for t in content] == pytest.approx(want["token_logprobs"])
        assert all(len(t["top_logprobs"]) == top for t in content)


def test_openai_responses_of_a_job_that_keeps_nanosecond_times(tmp_path, tiny_model):
    """output.format: openai with a kept nanosecond timestamp column: writing the responses
    turned every output column into Python values, which pyarrow cannot do for nanoseconds
    without pandas, so the run failed after its last batch, and every rerun the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [r["prompt"] for r in sample_prompts(4)]
    stamps = pa.array([1_700_000_000_123_456_789 + k for k in range(4)], pa.timestamp("ns", "UTC"))
    pq.write_table(pa.table({"prompt": prompts, "seen": stamps}), tmp_path / "in.parquet")
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        tmp_path / "in.parquet",
        tmp_path / "out",
        task={"max_new_tokens": 3},
        input={"keep_columns": ["seen"]},
    )
    # (the command's own process, where pyarrow is told pandas is absent)
    proc = cli_subprocess("run", str(job), "--set", "output.format=openai")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["0", "1", "2", "3"]
    assert read_outputs(tmp_path / "out").column("seen").combine_chunks().equals(stamps)


@pytest.mark.parametrize("name", ["tokens", "url", "embedding"])
def test_a_kept_column_named_as_a_response_field_is_refused(tmp_path, tiny_model, name):
    """A kept input column named as a field the OpenAI responses read was taken for the task's
    own: `tokens` (log-probs off) failed the run after its last batch with KeyError, `url` of
    /v1/embeddings the same, and `url` of /v1/completions would have made the row's response
    a text completion."""
    rows = [dict(r, **{name: "/v1/embeddings"}) for r in sample_prompts(3)]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"max_new_tokens": 3},
        input={"keep_columns": [name]},
    )
    proc = cli_subprocess("run", str(job), "--set", "output.format=openai")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bulkinfer: error: input.keep_columns: '{name}' is a field of the OpenAI responses "
        "this job writes; rename it in the input or drop it from keep_columns"
    ]
    assert cli("run", str(job), "--set", "output.format=parquet").exit_code == 0
