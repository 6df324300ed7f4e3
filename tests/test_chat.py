"""Chat prompts: a `messages` column rendered by the model's chat template, with the job's system
prompt where a conversation has none of its own."""

from __future__ import annotations

import json

import pytest
from conftest import cli, read_outputs, write_job, write_jsonl, write_parquet
from transformers import AutoTokenizer

SYSTEM = "You answer in one short sentence."

CHATS = [
    {"id": "plain", "messages": [{"role": "user", "content": "Where is Paris?"}]},
    {
        "id": "own-system",
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hello 東京 😀"},
        ],
    },
    {
        "id": "multi-turn",
        "messages": [
            {"role": "user", "content": "Name a fox."},
            {"role": "assistant", "content": "Émilie."},
            {"role": "user", "content": "And a dog?"},
        ],
    },
    {"id": "broken", "messages": [{"content": "no role"}]},
]


def _expected_messages(chat: list[dict]) -> list[dict]:
    if any(m["role"] == "system" for m in chat):
        return chat
    return [{"role": "system", "content": SYSTEM}, *chat]


def _prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_messages_column_is_found_and_gets_the_system_prompt(tmp_path, tiny_model):
    for fmt, writer in (("jsonl", write_jsonl), ("parquet", write_parquet)):
        rows = CHATS if fmt == "jsonl" else CHATS[:3]  # Parquet needs one struct type
        path = writer(tmp_path / f"chats.{fmt}", rows)
        job = write_job(
            tmp_path / f"{fmt}.yaml",
            tiny_model,
            path,
            tmp_path / fmt,
            task={"max_new_tokens": 4, "system_prompt": SYSTEM},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        out = read_outputs(tmp_path / fmt).to_pylist()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        assert [r["id"] for r in out] == [r["id"] for r in rows]
        for row, got in zip(rows[:3], out, strict=False):
            expected = _prompt_tokens(tokenizer, _expected_messages(row["messages"]))
            assert got["prompt_tokens"] == expected, row["id"]
            assert got["error"] is None
        if fmt == "jsonl":
            assert "role" in out[3]["error"]


def test_a_prompt_column_wins_over_messages(tmp_path, tiny_model):
    rows = [{"prompt": "the fox", "messages": [{"role": "user", "content": "x"}]}]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"max_new_tokens": 2, "chat_template": "never"},
    )
    assert cli("run", str(job)).exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = read_outputs(tmp_path / "out").to_pylist()
    assert out[0]["prompt_tokens"] == len(tokenizer("the fox")["input_ids"])


def test_messages_are_refused_where_chat_template_is_never(tmp_path, tiny_model):
    """`chat_template: never` with a messages column: every conversation went through the
    template all the same, with no word, and job.json recorded never."""
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "chats.jsonl", CHATS[:3]),
        tmp_path / "out",
        task={"max_new_tokens": 2, "chat_template": "never"},
    )
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        last = result.output.strip().splitlines()[-1]
        assert "chat messages" in last and "task.chat_template is never" in last, last
    assert not (tmp_path / "out" / "outputs").exists()


def test_a_system_prompt_a_model_without_a_chat_template_cannot_use(tmp_path, tiny_model):
    """The warning said plain prompts skip the template under `auto` and to set `always`, which
    then failed: the tokenizer has no template at all."""
    import json
    import shutil

    folder = shutil.copytree(tiny_model, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    job = write_job(
        tmp_path / "job.yaml",
        folder,
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the fox"}]),
        tmp_path / "out",
        task={"max_new_tokens": 2, "system_prompt": SYSTEM},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "tokenizer has no chat template" in result.output
    assert "chat_template: always" not in result.output


def test_message_content_given_as_text_parts(tmp_path, tiny_model):
    """Content as OpenAI's list of text parts reached the chat template as a list: 'chat
    template failed: can only concatenate str (not "list") to str' on every such row."""
    parts = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "Paris?"}]
    rows = [
        {"id": "parts", "messages": [{"role": "user", "content": parts}]},
        {"id": "string", "messages": [{"role": "user", "content": "Where is Paris?"}]},
        {"id": "image", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    ]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "chats.jsonl", rows),
        tmp_path / "out",
        task={"max_new_tokens": 3},
    )
    assert cli("run", str(job)).exit_code == 0
    parts_row, string_row, image_row = read_outputs(tmp_path / "out").to_pylist()
    assert parts_row["error"] is None
    assert parts_row["text"] == string_row["text"]
    assert parts_row["prompt_tokens"] == string_row["prompt_tokens"]
    assert "messages[0].content[0] is not a text part" in image_row["error"]


def test_messages_a_saved_dataset_stores_a_field_at_a_time(tmp_path, tiny_model):
    """`datasets` stores a Sequence of role and content as one list per field
    ({"role": [...], "content": [...]}): every such row was 'prompt is an object'."""
    datasets = pytest.importorskip("datasets")
    chats = [c for c in CHATS if c["id"] != "broken"]
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features(
        {"id": datasets.Value("string"), "messages": datasets.Sequence(turn)}
    )
    by_field = [
        {"id": c["id"], "messages": {k: [m[k] for m in c["messages"]] for k in turn}} for c in chats
    ]
    datasets.Dataset.from_list(by_field, features=features).save_to_disk(str(tmp_path / "saved"))
    outputs = []
    for name, inputs in (
        ("by-field", tmp_path / "saved"),
        ("by-turn", write_jsonl(tmp_path / "chats.jsonl", chats)),
    ):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"max_new_tokens": 3},
        )
        assert cli("run", str(job)).exit_code == 0
        outputs.append(read_outputs(tmp_path / name))
    assert outputs[0].column("error").null_count == len(chats)
    assert outputs[0].equals(outputs[1])


def test_a_completion_after_chat_messages_scores_its_own_tokens_only(tmp_path, tiny_model):
    """A prompt's trailing whitespace moves to its completion (lm-eval's split of 'Answer: '
    and ' yes'); on a prompt the chat template rendered, that was the newline ending the
    assistant header, scored as the completion's first token: one token too many, and the
    mean log-prob and perplexity of every row off. The sum now equals a direct computation."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows = [
        {
            "id": "a",
            "prompt": [{"role": "user", "content": "the capital?"}],
            "completion": "東京 fox",
        },
        {"id": "b", "prompt": [{"role": "user", "content": "lazy dog"}], "completion": "the quick"},
    ]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"type": "score"},
        input={"completion_column": "completion"},
    )
    assert cli("run", str(job)).exit_code == 0
    for row, out in zip(rows, read_outputs(tmp_path / "out").to_pylist(), strict=True):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert out["scored_tokens"] == len(answer)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        direct = sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer))
        assert math.isclose(out["logprob_sum"], direct, rel_tol=1e-4)


def test_messages_stored_as_maps_render_as_objects(tmp_path, tiny_model):
    """Spark writes a message as map<string, string>, which pyarrow reads as (key, value)
    pairs: every row failed as 'not an object with role and content'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.list_(pa.map_(pa.string(), pa.string()))
    turns = [[("role", "user"), ("content", "the quick brown fox")]]
    pq.write_table(
        pa.table({"id": [1], "prompt": pa.array([turns], message)}), tmp_path / "m.parquet"
    )
    write_jsonl(tmp_path / "o.jsonl", [{"id": 1, "prompt": [dict(turns[0])]}])
    outputs = []
    for name in ("m.parquet", "o.jsonl"):
        job = write_job(
            tmp_path / f"{name}.yaml", tiny_model, tmp_path / name, tmp_path / f"out-{name}"
        )
        assert cli("run", str(job)).exit_code == 0
        outputs.append(read_outputs(tmp_path / f"out-{name}").select(["prompt_tokens", "text"]))
    assert outputs[0].to_pylist() == outputs[1].to_pylist()
    assert outputs[0].column("text").to_pylist()[0] is not None


def test_messages_for_a_model_without_a_chat_template_name_the_row(tmp_path, tiny_model):
    """The whole job's error named no file or line: in a large or mixed input the user could
    not find the row that holds messages."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{"id": 1, "prompt": "plain"}, {"id": 2, "prompt": [{"role": "user", "content": "hi"}]}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(tmp_path / "job.yaml", model, inputs, tmp_path / "out")
    result = cli("run", str(job))
    assert result.exit_code == 2, result.output
    assert f"{inputs}:2: the prompts are chat messages" in result.output, result.output


def test_messages_without_any_text_are_a_row_error_as_an_empty_prompt_is(tmp_path, tiny_model):
    """A conversation whose every content was empty or whitespace ran (the model answered the
    template's headers alone), where an empty plain prompt is a row error."""
    rows = [
        {"id": "empty", "messages": [{"role": "user", "content": ""}]},
        {
            "id": "blank",
            "messages": [
                {"role": "system", "content": " "},
                {"role": "user", "content": [{"type": "text", "text": "\n"}]},
            ],
        },
        {
            "id": "fine",
            "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
        },
    ]
    job = write_job(
        tmp_path / "job.yaml", tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o"
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    errors = {r["id"]: r["error"] for r in read_outputs(tmp_path / "o").to_pylist()}
    assert errors["fine"] is None
    for name in ("empty", "blank"):
        assert errors[name] == "messages hold no text (every content is empty or whitespace)"
