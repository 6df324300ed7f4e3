"""Bounded memory: the spill files and the streaming output writer, exercised at small scale.

The chunk, spill-file, bucket and output-file sizes are shrunk so a few hundred rows cross every
boundary; the outputs must equal those of a run with the default sizes, before and after kills.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import child_env, cli, read_outputs, sample_prompts, write_job, write_jsonl

from bulkinfer.io.readers import read_ahead

N_ROWS = 160
# Every block size shrunk (README, Development: the documented settings).
SMALL = {
    "BULKINFER_CHUNK_ROWS": "7",
    "BULKINFER_SPILL_FILE_ROWS": "16",
    "BULKINFER_SPILL_GROUP_ROWS": "3",
    "BULKINFER_BUCKET_ROWS": "32",
    "BULKINFER_OUTPUT_FILE_ROWS": "50",
    "BULKINFER_OUTPUT_SLICE_ROWS": "5",
    "BULKINFER_OUTPUT_GROUP_ROWS": "20",
}


def _rows() -> list[dict]:
    rows = sample_prompts(N_ROWS)
    for i in range(10):  # the first chunks have no `source`: a null-typed keep column at first
        del rows[i]["source"]
    rows[40]["prompt"] = "   "
    rows[41]["prompt"] = None
    rows[150]["prompt"] = "fox " * 2000
    return rows


@pytest.fixture(scope="module")
def scale_job(tmp_path_factory, tiny_model):
    """A job with string ids, a kept column and bad rows, and its outputs at the default sizes."""
    tmp = tmp_path_factory.mktemp("scale")
    inputs = write_jsonl(tmp / "in.jsonl", _rows())

    def make(name: str):
        return write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            task={"type": "generate", "max_new_tokens": 3, "temperature": 0.7, "seed": 1},
            input={"keep_columns": ["source"]},
            batching={"max_tokens": 300, "max_batch_size": 6},
            checkpoint={"every_rows": 9},
        )

    reference = make("reference")
    assert cli("run", str(reference)).exit_code == 0
    return make, read_outputs(tmp / "reference")


def _run_small(*args, **env) -> subprocess.CompletedProcess:
    """The CLI with every size shrunk, in a child process (so it can be killed)."""
    return subprocess.run(
        [sys.executable, "-m", "bulkinfer", *map(str, args)],
        env={**child_env(), **SMALL, **env},
        capture_output=True,
        text=True,
    )


def test_row_groups_of_wide_rows_stop_near_their_byte_size(tmp_path, tiny_model):
    """Kept documents of 20,000 characters a row: each output slice was one row group whatever
    its bytes (560 rows of 4 MiB made one of 2.3 GB, read back whole). With groups shrunk to
    100,000 bytes, they hold the rows that fit (4), the values unchanged and in order."""
    rows = sample_prompts(30)
    for k, row in enumerate(rows):
        row["doc"] = f"{k:05d}" + "d" * 19_995
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"type": "score"},
        input={"keep_columns": ["doc"]},
    )
    done = _run_small("run", job, BULKINFER_OUTPUT_GROUP_BYTES="100000")
    assert done.returncode == 0, done.stderr
    (file,) = sorted((tmp_path / "out" / "outputs").glob("*.parquet"))
    meta = pq.read_metadata(file)
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sum(groups) == 30 and max(groups) == 4, groups
    assert read_outputs(tmp_path / "out").column("doc").to_pylist() == [r["doc"] for r in rows]


def test_reference_has_ids_keep_and_errors_in_input_order(scale_job):
    _, reference = scale_job
    rows = _rows()
    assert reference.column("id").to_pylist() == [r["id"] for r in rows]
    assert reference.column("source").to_pylist() == [r.get("source") for r in rows]
    errors = reference.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [40, 41, 150]


def test_small_chunks_spills_and_buckets_give_the_same_outputs(scale_job):
    make, reference = scale_job
    job = make("small")
    result = _run_small("run", job)
    assert result.returncode == 0, result.stderr
    out = job.parent / "small"
    files = sorted((out / "outputs").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [50, 50, 50, 10]
    # row groups of their size, however small the slices and buckets they were written from
    groups = [
        [
            pq.read_metadata(f).row_group(g).num_rows
            for g in range(pq.read_metadata(f).num_row_groups)
        ]
        for f in files
    ]
    assert groups == [[20, 20, 10]] * 3 + [[10]], groups
    assert read_outputs(out).equals(reference)
    assert not (out / "checkpoint" / "prepared").exists()
    assert not (out / "outputs.buckets").exists()


@pytest.mark.parametrize("point", ["part_written:7", "outputs_written"])
def test_kill_then_resume_with_small_chunks(scale_job, point):
    make, reference = scale_job
    job = make(f"kill-{point.split(':')[0]}")
    first = _run_small("run", job, BULKINFER_KILL_AT=point)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = _run_small("run", job)
    assert second.returncode == 0, second.stderr
    assert read_outputs(job.parent / job.stem).equals(reference)


def test_sharded_run_merges_in_bounded_buckets(scale_job):
    make, reference = scale_job
    job = make("sharded")
    for index in range(3):
        result = _run_small("run", job, "--shard", f"{index}/3")
        assert result.returncode == 0, result.stderr
    merged = read_outputs(job.parent / "sharded")
    assert merged.equals(reference)
    summary = json.loads((job.parent / "sharded" / "summary.json").read_text())
    assert summary["rows_out"] == N_ROWS


def test_duplicate_ids_far_apart_are_found_across_chunks(tmp_path, tiny_model):
    rows = [{"id": i * 3, "prompt": f"prompt {i}"} for i in range(200)]
    rows[170]["id"] = rows[12]["id"]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    result = _run_small("plan", job)
    assert result.returncode == 2
    assert "duplicate id 36 at" in result.stderr
    assert "in.jsonl:13 and" in result.stderr and "in.jsonl:171" in result.stderr


def test_read_ahead_keeps_order_and_raises_where_the_reader_failed():
    def chunks():
        yield from range(5)
        raise ValueError("bad line")

    seen = []
    with pytest.raises(ValueError, match="bad line"):
        for item in read_ahead(chunks(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_kept_columns_are_read_by_the_row_groups_that_hold_them(tmp_path, monkeypatch):
    """A shard's rows are spread over the whole input: its kept columns are read row group by
    row group (any rows, ranges crossing files and groups) as a whole read would give them."""
    import numpy as np
    import pyarrow as pa

    from bulkinfer.io import spill

    monkeypatch.setattr(spill, "SPILL_FILE_ROWS", 10)
    monkeypatch.setattr(spill, "SPILL_GROUP_ROWS", 3)
    files = spill.RowColumnFiles(tmp_path)
    rng = np.random.default_rng(0)
    texts = []
    for size in (4, 0, 7, 1, 13, 2, 9):  # chunks as a reader gives them
        chunk = [f"ü{len(texts) + i}" * int(rng.integers(1, 4)) for i in range(size)]
        texts += chunk
        files.append(pa.table({"id": pa.array(chunk, pa.string())}))
    files.finish()
    for _ in range(50):
        rows = np.sort(rng.choice(len(texts), size=int(rng.integers(0, 12)), replace=False))
        assert files.take(rows).column("id").to_pylist() == [texts[r] for r in rows]
        start = int(rng.integers(0, len(texts)))
        stop = int(rng.integers(start, len(texts) + 1))
        assert files.read(start, stop).column("id").to_pylist() == texts[start:stop]


def test_writing_the_outputs_of_many_parts_says_so(tmp_path, tiny_model, monkeypatch):
    """Reading every part back to write the outputs in input order took seconds at thousands of
    parts, after the last batch's line and before the summary, with nothing said meanwhile."""
    import bulkinfer.job.finish as finish

    monkeypatch.setattr(finish, "SAY_ASSEMBLY_PARTS", 4)  # 1,000 by default
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(12))
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"type": "score"},
        batching={"max_batch_size": 3},
        checkpoint={"every_rows": 1},  # a part a batch: 5 parts
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    parts = len(list((tmp_path / "out" / "checkpoint" / "parts").glob("*.parquet")))
    said = f"] writing the outputs: 12 rows from {parts} parts, in input order"
    assert parts >= 4 and said in result.output, result.output
    few = cli(
        "run", str(job), "--output", str(tmp_path / "few"), "--set", "checkpoint.every_rows=6"
    )
    assert few.exit_code == 0 and "writing the outputs" not in few.output, few.output
