"""Generation as one loop over the whole job: later checkpoint batches take slots while earlier
ones still decode, each batch comes back once its last row is done, and a kill while several
batches are in flight resumes to the outputs of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

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
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bulkinfer.engines.base import GenerateRequests, whole_groups
from bulkinfer.engines.kv import RegionAllocator
from bulkinfer.engines.sampling import SamplingParams, row_key
from bulkinfer.engines.scheduler import Row, Scheduler
from bulkinfer.engines.select import engine_around
from bulkinfer.errors import ModelError


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


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.sampled_from([-1, 2, 3, 5, 7, 9]), min_size=1, max_size=8),
    had=st.integers(0, 6),
    extra=st.integers(1, 10),
    ignore_eos=st.booleans(),
    logprobs=st.booleans(),
    top=st.integers(0, 2),
)
def test_a_chunk_s_tokens_taken_at_once_are_those_taken_one_by_one(
    tokens, had, extra, ignore_eos, logprobs, top
):
    """The scheduler takes a decode chunk's tokens for a row without stop strings in one go;
    row by row it ends as taking them one at a time does: the same tokens, log-probs and
    alternatives, the same reason, EOS (2, 3) and limits alike, a NaN (-1) raised only where
    the row had not ended before it."""
    engine = SimpleNamespace(slots=4, eos_ids={2, 3}, tokenizer=None)
    params = SamplingParams(had + extra, ignore_eos=ignore_eos)
    steps = len(tokens)
    lps = [-0.5 * (j + 1) for j in range(steps)]
    tops = ([[t, t + 1, t + 2] for t in tokens], [[-0.1, -0.2, -0.3]] * steps) if top else None
    outcomes = []
    for at_once in (False, True):
        scheduler = Scheduler(engine)
        scheduler.allocator = RegionAllocator(1000)
        row = Row(0, 0, np.ones(3, dtype=np.int64), had + extra, 1, params, logprobs, top)
        row.start = scheduler.allocator.allocate(row.need)
        row.tokens = [5] * had
        row.logprobs = [-1.0] * had if logprobs else []
        try:
            if at_once:
                done = scheduler._take(row, tokens, lps, tops)
            else:
                alts = zip(*tops, strict=True) if top else [None] * steps
                taken = zip(tokens, lps, alts, strict=True)
                done = any(scheduler._accept(row, t, lp, alt) for t, lp, alt in taken)
        except ModelError as exc:  # a NaN's scores
            outcomes.append(("raised", str(exc)))
            continue
        state = (row.tokens, row.logprobs, row.top_ids, row.top_logprobs, row.reason)
        outcomes.append((done, state, scheduler.new_tokens, scheduler.allocator.free))
    assert outcomes[0] == outcomes[1]


def test_rows_a_failed_stream_finished_count_once_when_run_again():
    """A stream that fails (a row out of memory) hands its batches to the batch-at-a-time
    loop, which runs the rows it had finished again: they counted twice, and the progress
    line read past the job's rows (14/12)."""
    from bulkinfer.observe.progress import Progress
    from bulkinfer.planner import Batch

    batches = [Batch(0, np.arange(0, 8), 5, 40), Batch(1, np.arange(8, 12), 3, 12)]
    progress = Progress(batches, batches, np.full(12, 10), log_every=3600)
    progress.advance(20, np.array([0, 1]), 20)  # two rows of batch 0 finish, then it fails
    for batch in batches:
        progress.update(batch, 8)
    assert (progress.done, progress.total) == (12, 12)
    assert progress.work_done == 120 and progress.work_left == 0
