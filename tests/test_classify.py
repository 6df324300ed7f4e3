"""classify: the top label, its probability and every label's probability, read back from the
Parquet output and compared with the model run directly through transformers."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    child_env,
    cli,
    cli_subprocess,
    one_thread,
    read_outputs,
    sample_prompts,
    write_input,
    write_job,
    write_jsonl,
)
from tiny_model import build_tiny_classifier, build_tiny_encoder

LABELS = ["négatif", "позитив", "😀 happy", "中立"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "single": build_tiny_classifier(
            root / "single", LABELS, texts=[r["prompt"] for r in sample_prompts(40)]
        ),
        "multi": build_tiny_classifier(
            root / "multi", ["a", "b", "c"], problem_type="multi_label_classification", seed=1
        ),
        "decoder": build_tiny_classifier(root / "decoder", ["no", "yes"], arch="llama", seed=2),
        "bare": build_tiny_encoder(root / "bare"),
    }


def direct_logits(folder, texts: list[str]) -> np.ndarray:
    """Each text alone through transformers: no padding, no batching."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        rows = [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts]
    return torch.stack(rows).numpy()


def classify_job(tmp_path, model, inputs, **task):
    return write_job(
        tmp_path / "job.yaml",
        model,
        inputs,
        tmp_path / "out",
        task={"type": "classify", "max_new_tokens": 128, **task},
        batching={"max_tokens": 2000, "max_batch_size": 16},
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_single_label_matches_transformers(tmp_path, models, fmt):
    rows = sample_prompts(40)
    rows[5]["prompt"] = None
    inputs = write_input(tmp_path, fmt, rows)
    job = classify_job(tmp_path, models["single"], inputs, all_labels=True)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    out = pq.read_table(sorted((tmp_path / "out" / "outputs").glob("*.parquet"))[0])
    assert out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.column("error")[5].as_py().startswith("prompt is null")
    ok = [i for i in range(len(rows)) if i != 5]
    probs = torch.softmax(
        torch.from_numpy(direct_logits(models["single"], [rows[i]["prompt"] for i in ok])), -1
    ).numpy()
    got = out.to_pandas().iloc[ok]
    # The tiny head is scaled to tell near-identical random encodings apart, which magnifies
    # float noise between a padded batch and a row alone to ~1e-5: compare at 1e-4.
    assert got["label"].tolist() == [LABELS[k] for k in probs.argmax(1)]
    np.testing.assert_allclose(got["probability"], probs.max(1), atol=1e-4)
    table = np.array([[row[name] for name in LABELS] for row in got["probabilities"]])
    np.testing.assert_allclose(table, probs, atol=1e-4)
    assert len(set(got["label"])) > 1, "the tiny model should not answer one label for all"
    assert out.schema.field("probabilities").type.num_fields == len(LABELS)
    assert (got["truncated_tokens"] == 0).all() and (got["prompt_tokens"] > 2).all()
    if fmt == "saved":  # and the output folder opens as a dataset, one float per label
        import datasets

        files = [str(f) for f in (tmp_path / "out" / "outputs").glob("*.parquet")]
        loaded = datasets.load_dataset("parquet", data_files=files, split="train")
        assert list(loaded.features["probabilities"]) == LABELS
        assert loaded[0]["probabilities"][LABELS[0]] == pytest.approx(table[0][0], abs=1e-6)


def test_multi_label_uses_sigmoid_and_a_threshold(tmp_path, models):
    rows = sample_prompts(24)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    probs = torch.sigmoid(
        torch.from_numpy(direct_logits(models["multi"], [r["prompt"] for r in rows]))
    ).numpy()
    # A threshold that splits the rows on the label that varies most.
    threshold = float(np.median(probs[:, probs.std(0).argmax()])) + 1e-3
    job = classify_job(tmp_path, models["multi"], inputs, threshold=threshold)
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out").to_pylist()
    for row, p in zip(out, probs, strict=True):
        got = [row["probabilities"][name] for name in "abc"]
        np.testing.assert_allclose(got, p, atol=1e-4)
        # labels by the job's own probabilities; by the direct ones where none sits within the
        # tolerance of the threshold (the batch's arithmetic may put it on either side)
        assert row["labels"] == [name for name in "abc" if row["probabilities"][name] >= threshold]
        if all(abs(q - threshold) > 1e-4 for q in p):
            assert row["labels"] == [n for n, q in zip("abc", p, strict=True) if q >= threshold]
        assert row["label"] == "abc"[int(p.argmax())]
    assert len({tuple(r["labels"]) for r in out}) > 1, "the threshold should split the rows"


def test_decoder_classifier_reads_each_rows_last_real_token(tmp_path, models):
    """Rows of different lengths share right-padded batches; each must equal the row alone."""
    rows = sample_prompts(30)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = classify_job(tmp_path, models["decoder"], inputs, all_labels=True)
    assert cli("run", str(job)).exit_code == 0
    out = read_outputs(tmp_path / "out").to_pylist()
    logits = direct_logits(models["decoder"], [r["prompt"] for r in rows])
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    got = np.array([[r["probabilities"]["no"], r["probabilities"]["yes"]] for r in out])
    np.testing.assert_allclose(got, probs, atol=1e-5)


def test_truncation_is_explicit_and_counted(tmp_path, models):
    """Over the model's 512 positions: a row error by default; cut and counted when asked, with
    the result of the tokenizer's own truncation ([CLS] ... [SEP])."""
    long_text = " ".join(["the quick brown fox"] * 150)
    rows = [{"id": "short", "prompt": "the lazy dog"}, {"id": "long", "prompt": long_text}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = classify_job(tmp_path, models["single"], inputs)
    assert cli("run", str(job)).exit_code == 0
    refused = read_outputs(tmp_path / "out").to_pylist()
    assert refused[0]["error"] is None
    assert "more than the model's context of 512" in refused[1]["error"]
    assert "task.truncate: true" in refused[1]["error"]

    job = classify_job(tmp_path, models["single"], inputs, truncate=True, all_labels=True)
    assert cli("run", str(job), "--overwrite").exit_code == 0
    cut = read_outputs(tmp_path / "out").to_pylist()[1]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["single"])
    full = len(tokenizer(long_text).input_ids)
    assert cut["error"] is None and cut["prompt_tokens"] == 512
    assert cut["truncated_tokens"] == full - 512
    encoded = tokenizer(long_text, truncation=True, max_length=512, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(models["single"]).eval()
    with torch.no_grad():
        probs = torch.softmax(model(**encoded).logits[0], -1).numpy()
    np.testing.assert_allclose([cut["probabilities"][n] for n in LABELS], probs, atol=1e-4)


def test_resume_after_a_kill_gives_the_same_outputs(tmp_path, models):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(40))
    jobs = {}
    for name in ("reference", "killed"):
        jobs[name] = write_job(
            tmp_path / f"{name}.yaml",
            models["multi"],
            inputs,
            tmp_path / name,
            task={"type": "classify", "max_new_tokens": 128, "all_labels": True},
            batching={"max_tokens": 1500, "max_batch_size": 8},
            checkpoint={"every_rows": 8},
        )
    with one_thread():  # as in the child process: bit-identical arithmetic
        assert cli("run", str(jobs["reference"])).exit_code == 0
    env = {**child_env(), "BULKINFER_KILL_AT": "part_written:3"}
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(jobs["killed"])],
        env=env,
        capture_output=True,
    )
    assert first.returncode == -signal.SIGKILL
    with one_thread():
        second = cli("run", str(jobs["killed"]))
    assert second.exit_code == 0, second.output
    assert "resuming:" in second.output
    assert read_outputs(tmp_path / "killed").equals(read_outputs(tmp_path / "reference"))


def test_a_model_without_a_trained_head_is_refused(tmp_path, models):
    """In one line: transformers' LOAD REPORT table of the missing weights came before it."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    job = classify_job(tmp_path, models["bare"], inputs)
    result = cli_subprocess("run", str(job))
    assert result.returncode == 2
    errors = [
        line for line in result.stderr.splitlines() if "LOAD REPORT" in line or "error" in line
    ]
    assert len(errors) == 1 and "lacks a trained classification head" in errors[0], result.stderr


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"type": "generate", "pooling": "cls"}, "task.pooling: applies to embed"),
        ({"type": "classify", "temperature": 0.5}, "task.temperature: applies to generate"),
        ({"type": "classify", "threshold": 1.5}, "task.threshold: 1.5 must be between"),
        ({"type": "score", "truncate": True}, "task.truncate: applies to classify and embed"),
        ({"type": "classify", "multi_label": "yes"}, "task.multi_label: expected true or false"),
    ],
)
def test_task_keys_of_another_type_are_refused(tmp_path, models, task, message):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(3))
    task = {"max_new_tokens": 128, **task}  # write_job's generate default
    job = write_job(tmp_path / "job.yaml", models["single"], inputs, tmp_path / "out", task=task)
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert message in result.output
