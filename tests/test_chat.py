"""Chat prompts: a `messages` column rendered by the model's chat template, with the job's system
prompt where a conversation has none of its own."""

from __future__ import annotations

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
