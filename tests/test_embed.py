"""embed: fixed-size float32 vectors, read back from Parquet and compared with the model's last
hidden states pooled directly in the test; sharded and resumed runs give the same vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import (
    child_env,
    cli,
    one_thread,
    read_outputs,
    sample_prompts,
    write_input,
    write_job,
    write_jsonl,
)
from tiny_model import build_tiny_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("encoders") / "bert")


def direct_embeddings(folder, texts, pooling: str, normalize: bool) -> np.ndarray:
    """Each text alone through transformers' AutoModel, pooled by hand."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vector = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling]
            out.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return torch.stack(out).numpy()


def embed_job(tmp_path, model, inputs, name="out", **task):
    return write_job(
        tmp_path / f"{name}.yaml",
        model,
        inputs,
        tmp_path / name,
        task={"type": "embed", "max_new_tokens": 128, **task},
        input={"keep_columns": ["source"]},
        batching={"max_tokens": 1500, "max_batch_size": 8},
        checkpoint={"every_rows": 8},
    )


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(len(column), -1)


@pytest.mark.parametrize(
    ("fmt", "pooling", "normalize"),
    [("jsonl", "mean", True), ("parquet", "cls", False), ("saved", "last", True)],
)
def test_embeddings_match_transformers(tmp_path, encoder, fmt, pooling, normalize):
    rows = sample_prompts(30)
    inputs = write_input(tmp_path, fmt, rows)
    job = embed_job(tmp_path, encoder, inputs, pooling=pooling, normalize=normalize)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out")
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.column("source").to_pylist() == [r["source"] for r in rows]
    expected = direct_embeddings(encoder, [r["prompt"] for r in rows], pooling, normalize)
    np.testing.assert_allclose(vectors(out), expected, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(vectors(out), axis=1), 1.0, atol=1e-5)
    frame = out.to_pandas()  # pandas reads the column as one array per row
    assert frame["embedding"].iloc[0].shape == (32,)
    if fmt == "saved":  # and the output folder opens as a dataset of fixed-length vectors
        import datasets

        files = [str(f) for f in (tmp_path / "out" / "outputs").glob("*.parquet")]
        loaded = datasets.load_dataset("parquet", data_files=files, split="train")
        assert loaded.features["embedding"].length == 32
        np.testing.assert_allclose(loaded[3]["embedding"], expected[3], atol=1e-5)


def test_decoder_model_with_last_token_pooling(tmp_path, tiny_model):
    """A causal LM checkpoint as an embedder: AutoModel drops the LM head; rows of different
    lengths share right-padded batches and each reads its own last real token."""
    rows = sample_prompts(20)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = embed_job(tmp_path, tiny_model, inputs, pooling="last")
    assert cli("run", str(job)).exit_code == 0
    expected = direct_embeddings(tiny_model, [r["prompt"] for r in rows], "last", False)
    np.testing.assert_allclose(vectors(read_outputs(tmp_path / "out")), expected, atol=1e-5)


def test_auto_pooling_needs_a_pooling_config(tmp_path, encoder):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    result = cli("run", str(embed_job(tmp_path, encoder, inputs)))
    assert result.exit_code == 2
    assert "task.pooling:" in result.output and "no sentence-transformers pooling" in result.output


def test_completion_column_is_refused(tmp_path, encoder):
    rows = [dict(r, answer="x") for r in sample_prompts(3)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = embed_job(tmp_path, encoder, inputs, pooling="mean")
    result = cli("run", str(job), "--set", "input.completion_column=answer")
    assert result.exit_code == 2 and "input.completion_column" in result.output


def test_shards_and_resume_after_a_kill_give_the_same_vectors(tmp_path, encoder):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(40))
    reference_job = embed_job(tmp_path, encoder, inputs, "reference", pooling="mean")
    with one_thread():  # as in the child process: bit-identical arithmetic
        assert cli("run", str(reference_job)).exit_code == 0
    reference = read_outputs(tmp_path / "reference")

    killed = embed_job(tmp_path, encoder, inputs, "killed", pooling="mean")
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:2"}
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(killed)], env=env, capture_output=True
    )
    assert first.returncode == -9
    with one_thread():
        second = cli("run", str(killed))
    assert second.exit_code == 0, second.output
    assert "resuming:" in second.output and "batches already done" in second.output
    assert read_outputs(tmp_path / "killed").equals(reference)

    sharded = embed_job(tmp_path, encoder, inputs, "sharded", pooling="mean")
    for i in range(2):
        assert cli("run", str(sharded), "--shard", f"{i}/2").exit_code == 0
    merged = read_outputs(tmp_path / "sharded")
    # Shards batch rows differently, so vectors agree to float noise rather than bit for bit.
    assert merged.drop(["embedding"]).equals(reference.drop(["embedding"]))
    np.testing.assert_allclose(vectors(merged), vectors(reference), atol=1e-5)
    status = cli("status", str(tmp_path / "sharded"))
    assert "2 of 2 shards done" in status.output
