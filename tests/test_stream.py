"""Generation as one loop over the whole job: later checkpoint batches take slots while earlier
ones still decode, each batch comes back once its last row is done, and a kill while several
batches are in flight resumes to the outputs of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    child_env,
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
)
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bulkinfer.engines.base import GenerateRequests, whole_groups
from bulkinfer.engines.sampling import SamplingParams, row_key
from bulkinfer.engines.select import engine_around


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return engine_around(model, tokenizer, "reference"), engine_around(model, tokenizer, slots=6)


def groups_of(n_groups: int, rows: int, vocab: int, params: SamplingParams):
    rng = np.random.default_rng(5)
    out = []
    for g in range(n_groups):
        prompts = [rng.integers(4, vocab, int(rng.integers(1, 30))) for _ in range(rows)]
        keys = [row_key(params.seed, g * rows + i) for i in range(rows)]
        limits = [int(x) for x in rng.integers(1, 20, rows)]
        out.append(GenerateRequests(prompts, keys, [params] * rows, limits, logprobs=True))
    return out


def test_later_groups_take_slots_before_earlier_ones_finish(engines):
    reference, fast = engines
    params = SamplingParams(20, temperature=0.9, seed=11)
    groups = groups_of(5, 2, fast.model.config.vocab_size, params)
    events = []

    def feed():
        for g, requests in enumerate(groups):
            events.append(("in", g))
            yield g, requests

    got = {}
    for g, generations in whole_groups(fast, feed()):
        events.append(("out", g))
        got[g] = generations
    first_out = events.index(next(e for e in events if e[0] == "out"))
    assert sum(1 for e in events[:first_out] if e[0] == "in") >= 3  # 6 slots, groups of 2
    # each group equals the reference engine's run of it alone, token for token
    for g, requests in enumerate(groups):
        alone = reference.generate(
            requests.prompts, requests.keys, params, requests.limits, logprobs=True
        )
        assert [x.tokens for x in got[g]] == [x.tokens for x in alone]
        assert [x.finish_reason for x in got[g]] == [x.finish_reason for x in alone]
        for ours, theirs in zip(got[g], alone, strict=True):
            assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def stream_job(tmp_path_factory, tiny_model):
    """A sampled job of many 3-row batches on the fast engine (64 CPU slots: a dozen batches
    in flight at once), and the outputs of the reference engine's uninterrupted run of it."""
    tmp = tmp_path_factory.mktemp("stream")
    inputs = write_jsonl(tmp / "in.jsonl", sample_prompts(60))

    def make(name: str, engine: str = "fast"):
        job = write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            task={"temperature": 0.8, "seed": 3, "max_new_tokens": 8, "n": 2, "logprobs": True},
            batching={"max_tokens": 400, "max_batch_size": 3},
            checkpoint={"every_rows": 3},
        )
        spec = yaml.safe_load(job.read_text())
        spec["model"]["engine"] = engine
        job.write_text(yaml.safe_dump(spec))
        return job

    reference = make("reference", engine="reference")
    assert cli("run", str(reference)).exit_code == 0
    return make, read_outputs(tmp / "reference")


def same(a, b) -> None:
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for name in ("text", "token_ids", "finish_reason", "output_tokens"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def test_the_stream_gives_the_reference_engines_outputs(stream_job):
    make, reference = stream_job
    job = make("uninterrupted")
    assert cli("run", str(job)).exit_code == 0
    same(read_outputs(job.parent / "uninterrupted"), reference)


@pytest.mark.parametrize("point", ["batch_start:9", "part_committed:2", "part_written:4"])
def test_a_kill_with_batches_in_flight_resumes_to_the_same_outputs(stream_job, point):
    make, reference = stream_job
    name = "kill-" + point.replace(":", "-")
    job = make(name)
    env = {**child_env(), "BULKINFER_KILL_AT": point}
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)], env=env, capture_output=True
    )
    assert first.returncode == -signal.SIGKILL
    second = cli_subprocess("run", str(job))
    assert second.returncode == 0, second.stderr
    same(read_outputs(job.parent / name), reference)
