"""End to end: `bulkinfer run` on real files with a tiny model, outputs read back and compared."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
    write_parquet,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_generate_jsonl_one_row_per_input_in_input_order(tmp_path, tiny_model):
    rows = sample_prompts(40)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        input={"keep_columns": ["source"]},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out")
    assert out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.column("source").to_pylist() == [r["source"] for r in rows]
    assert out.column("error").null_count == len(rows)
    assert set(out.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 <= n <= 6 for n in out.column("output_tokens").to_pylist())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 40
    assert summary["rows_by_status"] == {"ok": 40, "error": 0}
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet")
    assert sum(stats.column("rows").to_pylist()) == 40
    assert all(p <= 600 for p in stats.column("padded_tokens").to_pylist())


def test_greedy_generation_matches_transformers_generate(tmp_path, tiny_model):
    rows = sample_prompts(12)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"max_new_tokens": 8, "chat_template": "never"},
    )
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for row, got in zip(rows, out, strict=True):
        ids = tokenizer(row["prompt"], return_tensors="pt")
        ref = model.generate(**ids, max_new_tokens=8, do_sample=False)
        text = tokenizer.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert got["text"] == text, row["id"]


def test_parquet_input_and_score_task_match_a_direct_computation(tmp_path, tiny_model):
    rows = sample_prompts(20)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_parquet(tmp_path / "in.parquet", rows),
        tmp_path / "out",
        task={"type": "score"},
    )
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for row, got in zip(rows, out, strict=True):
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
        expected = logprobs.gather(-1, ids[0, 1:, None]).sum().item()
        assert got["scored_tokens"] == ids.shape[1] - 1
        assert got["logprob_sum"] == pytest.approx(expected, rel=1e-4)
        assert got["perplexity"] == pytest.approx(
            math.exp(-expected / (ids.shape[1] - 1)), rel=1e-4
        )


def test_score_completion_counts_only_completion_tokens(tmp_path, tiny_model):
    rows = [
        {"id": i, "prompt": "The capital of France is", "completion": c}
        for i, c in enumerate([" Paris", " a big city"])
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
    out = read_outputs(tmp_path / "out").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row, got in zip(rows, out, strict=True):
        assert got["id"] == row["id"]
        assert got["scored_tokens"] == len(
            tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        )


def test_sampling_is_reproducible_and_independent_of_batching(tmp_path, tiny_model):
    rows = sample_prompts(24)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    texts = []
    for name, max_tokens in (("a", 3000), ("b", 300)):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_new_tokens": 8},
            batching={"max_tokens": max_tokens},
        )
        assert cli("run", str(job)).exit_code == 0
        texts.append(read_outputs(tmp_path / name).column("text").to_pylist())
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 1


def test_stop_strings_cut_the_text(tmp_path, tiny_model):
    rows = sample_prompts(10)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "a.yaml", tiny_model, inputs, tmp_path / "a", task={"max_new_tokens": 12}
    )
    assert cli("run", str(job)).exit_code == 0
    free = read_outputs(tmp_path / "a").column("text").to_pylist()
    stop = next(t[2:4] for t in free if len(t) > 5 and t[2:4].strip())
    job = write_job(
        tmp_path / "b.yaml",
        tiny_model,
        inputs,
        tmp_path / "b",
        task={"max_new_tokens": 12, "stop": [stop]},
    )
    assert cli("run", str(job)).exit_code == 0
    stopped = read_outputs(tmp_path / "b").to_pylist()
    for full, got in zip(free, stopped, strict=True):
        if stop in full:
            assert got["text"] == full[: full.index(stop)]
            assert got["finish_reason"] == "stop"
        else:
            assert got["text"] == full


def _byte_tokens(tokenizer, data: bytes) -> list[int]:
    """A byte-level BPE tokenizer's one-byte tokens for `data` (GPT-2's byte-to-character map)."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    char = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    return tokenizer.convert_tokens_to_ids([char[b] for b in data])


def test_a_stop_string_is_seen_however_many_byte_tokens_it_spans(tiny_model):
    """A byte-level tokenizer may spend a token on each UTF-8 byte: three emoji are 12 tokens,
    and the stop is seen the step its last byte is out; the first bytes of a character, which
    decode to U+FFFD on their own, never match a stop string holding U+FFFD."""
    from bulkinfer.engines.stops import stop_hit

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = _byte_tokens(tokenizer, "ab 😀😀😀".encode())
    assert tokenizer.decode(ids) == "ab 😀😀😀"
    assert stop_hit(tokenizer, ids, ("😀😀😀",))
    assert not stop_hit(tokenizer, ids[:-1], ("😀😀😀",))
    east = _byte_tokens(tokenizer, "東x".encode())
    assert [stop_hit(tokenizer, east[:n], ("\ufffd",)) for n in (1, 2, 3, 4)] == [False] * 4


def test_messages_column_goes_through_the_chat_template(tmp_path, tiny_model):
    rows = [
        {"id": "a", "prompt": [{"role": "user", "content": "hello there"}]},
        {
            "id": "b",
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "the fox"},
            ],
        },
        {"id": "c", "prompt": [{"role": "user"}]},
    ]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out").to_pylist()
    assert [r["error"] is None for r in out] == [True, True, False]
    assert "role" in out[2]["error"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(
        rows[0]["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert out[0]["prompt_tokens"] == len(
        tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )


def test_row_problems_become_per_row_errors_and_rows_are_kept(tmp_path, tiny_model):
    rows = sample_prompts(6) + [
        {"id": "null", "prompt": None, "source": "x"},
        {"id": "empty", "prompt": "   ", "source": "x"},
        {"id": "number", "prompt": 42, "source": "x"},
        {"id": "long", "prompt": "fox " * 2000, "source": "x"},
    ]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    assert cli("run", str(job)).exit_code == 0
    out = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert len(out) == len(rows)
    assert "null" in out["null"]["error"]
    assert "empty" in out["empty"]["error"]
    assert "int" in out["number"]["error"]
    assert "context" in out["long"]["error"]
    assert out["long"]["text"] is None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_by_status"] == {"ok": 6, "error": 4}


def test_gzip_folder_and_glob_inputs(tmp_path, tiny_model):
    import gzip

    rows = sample_prompts(30)
    folder = tmp_path / "data"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:10])
    write_parquet(folder / "b.parquet", rows[10:20])
    write_jsonl(folder / "c.jsonl", rows[20:])
    for name, pattern in (("folder", folder), ("glob", folder / "*")):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            str(pattern),
            tmp_path / name,
            task={"type": "score"},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        assert read_outputs(tmp_path / name).column("id").to_pylist() == [r["id"] for r in rows]


def test_jsonl_compressed_with_zstd_bzip2_or_xz(tmp_path, tiny_model):
    """Large JSONL dumps often come as .jsonl.zst (or .bz2, .xz): 'unknown file type' before."""
    import bz2
    import lzma

    import pyarrow as pa

    rows = sample_prompts(12)
    a, b, c = ("".join(json.dumps(r) + "\n" for r in rows[k : k + 4]).encode() for k in (0, 4, 8))
    folder = tmp_path / "data"
    folder.mkdir()
    with pa.CompressedOutputStream(str(folder / "a.jsonl.zst"), "zstd") as f:
        f.write(a)
    (folder / "b.ndjson.bz2").write_bytes(bz2.compress(b))
    (folder / "c.json.xz").write_bytes(lzma.compress(c))
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    for name, inputs in (("packed", folder), ("plain", plain)):
        job = write_job(tmp_path / f"{name}.yaml", tiny_model, inputs, tmp_path / name)
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "packed").equals(read_outputs(tmp_path / "plain"))
    check = cli("validate", str(tmp_path / "packed.yaml"))
    assert check.exit_code == 0 and "3 files" in check.output, check.output
    (folder / "a.jsonl.zst").write_bytes(b"not zstd at all")
    broken = cli("run", str(tmp_path / "packed.yaml"), "--overwrite")
    assert broken.exit_code == 2, broken.output
    assert "a.jsonl.zst: not a readable zstd file" in broken.output.strip().splitlines()[-1]


def test_rows_without_ids_get_their_position(tmp_path, tiny_model):
    rows = [{"prompt": p["prompt"]} for p in sample_prompts(5)]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    assert cli("run", str(job)).exit_code == 0
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == [0, 1, 2, 3, 4]


def test_gpt2_shape_with_no_pad_token(tmp_path, tiny_gpt2):
    rows = sample_prompts(9)
    job = write_job(
        tmp_path / "job.yaml", tiny_gpt2, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    )
    assert cli("run", str(job)).exit_code == 0
    assert read_outputs(tmp_path / "out").num_rows == 9


def test_gpt2_scores_of_padded_rows_without_a_false_alarm(tmp_path, tiny_gpt2):
    """Rows of a score batch are right-padded, which causal attention never looks at; GPT-2's
    forward saw its pad token at the end of a row and printed transformers' warning to pass an
    attention mask, on every score job of a GPT-2 model. Each row's score is its score alone."""
    rows = sample_prompts(6)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_gpt2,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"type": "score"},
    )
    run = cli_subprocess("run", str(job))
    assert run.returncode == 0, run.stderr
    assert "attention_mask" not in run.stderr, run.stderr
    batched = read_outputs(tmp_path / "out").column("logprob_sum").to_pylist()
    alone = cli_subprocess(
        "run", str(job), "--output", str(tmp_path / "alone"), "--set", "batching.max_batch_size=1"
    )
    assert alone.returncode == 0, alone.stderr
    single = read_outputs(tmp_path / "alone").column("logprob_sum").to_pylist()
    assert batched == pytest.approx(single, rel=1e-5)


def test_poison_rows_are_isolated_by_bisection(tmp_path, tiny_model):
    """A model whose embedding table is smaller than the tokenizer's vocabulary fails exactly on
    the rows that contain an out-of-range token; every other row of their batches still runs."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = AutoConfig.from_pretrained(broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    cut = 300
    weights = {
        k: v[:cut].clone() if v.shape[0] == config.vocab_size else v
        for k, v in load_file(broken / "model.safetensors").items()
    }
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config.vocab_size = cut
    config.save_pretrained(broken)

    rows = sample_prompts(24)
    poisoned = {r["id"] for r in rows if max(tokenizer(r["prompt"])["input_ids"]) >= cut}
    assert 0 < len(poisoned) < len(rows)
    job = write_job(
        tmp_path / "job.yaml",
        broken,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"chat_template": "never"},
        batching={"max_tokens": 4000, "max_batch_size": 8},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    out = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert {i for i, r in out.items() if r["error"]} == poisoned
    assert all("IndexError" in out[i]["error"] for i in poisoned)
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet")
    assert sum(stats.column("failed_rows").to_pylist()) == len(poisoned)
    assert sum(stats.column("splits").to_pylist()) > 0


def test_keep_column_that_shadows_an_output_is_refused(tmp_path, tiny_model):
    rows = [dict(r, text="mine") for r in sample_prompts(3)]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        input={"keep_columns": ["text"]},
    )
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "input.keep_columns: 'text' clashes" in result.output


def test_paths_in_the_spec_are_spec_relative_and_command_line_paths_cwd_relative(
    tmp_path, tiny_model, monkeypatch
):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_jsonl(tmp_path / "data.jsonl", sample_prompts(3))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(
        b"\xef\xbb\xbf" + (tmp_path / "data.jsonl").read_bytes().replace(b"\n", b"\r\n")
    )
    job = jobs / "job.yaml"
    job.write_text(
        f"model: {{path: {tiny_model}}}\ninput: {{path: ../data.jsonl}}\noutput: {{path: ../out/a}}\n"
        "task: {max_new_tokens: 2}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli("run", str(job)).exit_code == 0
    assert read_outputs(tmp_path / "out" / "a").num_rows == 3
    result = cli("run", "jobs/job.yaml", "--set", "input.path=bom.jsonl", "--output", "out/b")
    assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "out" / "b").column("id").to_pylist() == [
        "q-0000",
        "q-0001",
        "q-0002",
    ]


def test_parquet_messages_column_and_output_folder_inside_the_input_folder(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": i, "messages": [{"role": "user", "content": p["prompt"]}], "source": p["source"]}
        for i, p in enumerate(sample_prompts(6))
    ]
    write_parquet(data / "chats.parquet", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        data,
        data / "out",
        input={"prompt_column": "messages", "keep_columns": ["source"]},
    )
    for _ in range(2):  # the rerun must not read the first run's outputs as input
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
    out = read_outputs(data / "out")
    assert out.column("id").to_pylist() == list(range(6))
    assert out.column("error").null_count == 6


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2", "gpt_neox"])
def test_other_architectures_match_transformers(tmp_path, arch):
    from tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / arch, arch=arch)
    rows = sample_prompts(10)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for task in ("generate", "score"):
        job = write_job(
            tmp_path / f"{task}.yaml",
            model_dir,
            inputs,
            tmp_path / task,
            task={"type": task, "max_new_tokens": 5, "chat_template": "never"},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        out = read_outputs(tmp_path / task).to_pylist()
        for row, got in zip(rows, out, strict=True):
            ids = tokenizer(row["prompt"], return_tensors="pt")
            if task == "generate":
                ref = model.generate(**ids, max_new_tokens=5, do_sample=False)
                text = tokenizer.decode(
                    ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
                )
                assert got["text"] == text
            else:
                with torch.no_grad():
                    logprobs = model(ids["input_ids"]).logits[0, :-1].float().log_softmax(-1)
                expected = logprobs.gather(-1, ids["input_ids"][0, 1:, None]).sum().item()
                assert got["logprob_sum"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("batch_size", ["auto", 40])
def test_max_batch_size_auto_is_resolved_once_and_kept_in_job_json(
    tmp_path, tiny_model, batch_size
):
    """auto: 256 rows a batch on the CPU (the fast engine's 4x decode slots for generate on a
    GPU); the resolved number is written to job.json so a resume plans the same batches."""
    rows = [{"id": f"r{i}", "prompt": f"word {i % 7}"} for i in range(300)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"type": "score"},
        batching={"max_tokens": 100_000, "max_batch_size": batch_size},
        checkpoint={"every_rows": 1000},
    )
    assert cli("run", str(job)).exit_code == 0
    expected = 256 if batch_size == "auto" else batch_size
    assert json.loads((tmp_path / "out" / "job.json").read_text())["max_batch_size"] == expected
    sizes = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").column("rows").to_pylist()
    assert max(sizes) == expected and sum(sizes) == 300
    assert read_outputs(tmp_path / "out").column("id").to_pylist() == [r["id"] for r in rows]


def test_two_folders_trade_places_in_one_step_or_not_at_all(tmp_path):
    """What outputs/ is replaced with on Linux (renameat2 RENAME_EXCHANGE); elsewhere, or with
    a path missing, it reports False and changes nothing (the two renames then do it)."""
    import sys

    from bulkinfer.io.outputs import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").touch()
    (b / "old").touch()
    swapped = _exchange(a, b)
    assert swapped or not sys.platform.startswith("linux")
    if swapped:
        assert [p.name for p in a.iterdir()] == ["old"] and [p.name for p in b.iterdir()] == ["new"]
    assert _exchange(a, tmp_path / "missing") is False
    assert a.is_dir() and not (tmp_path / "missing").exists()
