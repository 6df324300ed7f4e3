"""The end of a job: the final dataset from the committed parts, per-batch stats, the summary
(written last: its presence marks the job done) and the OpenAI batch responses."""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections import Counter

import numpy as np

from bulkinfer.console import launched_worker
from bulkinfer.errors import counted
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.outputs import assemble_outputs, error_rows_table, write_stats
from bulkinfer.job.batch import rows_in_flight
from bulkinfer.job.exits import writes_reported
from bulkinfer.observe.progress import log, log_format, say
from bulkinfer.observe.stats import ModelCost, format_summary, stats_table, summarize
from bulkinfer.planner import padding_fraction
from bulkinfer.prepare import PreparedRows
from bulkinfer.sharding import Shard
from bulkinfer.state.manifest import Manifest
from bulkinfer.state.records import Summary

# the outputs' assembly reads every part (about 1 ms each on two cores, more for bigger parts):
# past these it says it is under way, after the last batch's line
SAY_ASSEMBLY_PARTS = 1_000
SAY_ASSEMBLY_ROWS = 1_000_000


def finish_job(
    layout, manifest: Manifest, prepared: PreparedRows, schema, run_id, started, rows, keep_row
) -> Summary:
    """Assemble the final dataset (or this shard's part of it) and the per-batch stats; returns
    the summary to write last."""
    bad = np.fromiter(prepared.row_errors, dtype=np.int64, count=len(prepared.row_errors))
    bad = bad[np.isin(bad, rows)]
    errors = error_rows_table({int(r): prepared.row_errors[int(r)] for r in bad}, schema)
    parts = manifest.part_files()
    if len(parts) >= SAY_ASSEMBLY_PARTS or len(rows) >= SAY_ASSEMBLY_ROWS:
        log(
            f"writing the outputs: {len(rows):,} rows from {len(parts):,} parts, in input order",
            event="assemble",
            rows=len(rows),
            parts=len(parts),
        )
    counts = assemble_outputs(layout, parts, errors, prepared.columns_of, rows, keep_row=keep_row)
    if counts.errors:
        reasons = [prepared.row_errors[int(r)] for r in bad]
        log(failed_rows(counts.errors, counts.rows, reasons), level="warning", failed=counts.errors)
    records = [(r.run, s) for r in manifest.records for s in r.stats]
    write_stats(layout, stats_table(records))
    earlier = {}
    for r in manifest.records:
        if r.run != run_id:
            earlier[r.run] = max(earlier.get(r.run, 0.0), r.elapsed)
    wall = sum(earlier.values()) + (time.monotonic() - started)
    totals = summarize(
        stats=[s for _, s in records],
        rows_in=len(rows),
        rows_out=counts.rows,
        rows_by_status={"ok": counts.rows - counts.errors, "error": counts.errors},
        wall_seconds=wall,
    )
    return Summary.from_dict(totals)


def failed_rows(failed: int, rows: int, input_errors: list[str]) -> str:
    """One line at the end of a run with failed rows: how many, and the commonest reason found
    in the input (a prompt of the wrong type in every row says so here, not only row by row)."""
    line = f"{failed:,} of {rows:,} rows failed: each one's error column says why"
    if input_errors:
        message, count = Counter(input_errors).most_common(1)[0]
        # rows the model failed on are not among these: then this is the input's commonest
        what = "the most common" if len(input_errors) == failed else "the most common in the input"
        if count == 1:  # every reason differs: one of them
            what = "one of them" if len(input_errors) == failed else "one in the input"
            line += f"; {what}: {message}"
        else:
            line += f"; {what}, in {count:,} rows: {message}"
    return line


def write_responses(layout: OutputLayout, model_path: str, tokenizer) -> None:
    from bulkinfer.engines.constraints import token_bytes_of
    from bulkinfer.io.openai_batch import write_responses_file

    lines, errors = write_responses_file(layout, model_path, lambda: token_bytes_of(tokenizer))
    log(
        f"wrote {lines:,} OpenAI batch responses to {layout.responses} "
        f"({errors:,} failed, also in {layout.errors.name})"
    )


def model_cost(engine) -> ModelCost | None:
    """The engine's FLOPs, weight and KV bytes per token and its device's peaks."""
    return ModelCost.of(engine)


def hardware_summary(summary: Summary, engine) -> dict:
    """Shares of the device's peak FLOP/s and memory bandwidth the job reached."""
    cost = model_cost(engine)
    if cost is None or not summary.batches:
        return {}
    rows = summary.rows_out
    return cost.fractions(
        summary.input_tokens,
        summary.output_tokens,
        rows,
        summary.model_seconds,
        rows_in_flight(engine, rows / summary.batches),
    )


def device_memory(engine) -> dict:
    """On a GPU, the most device memory the job held: allocated by its tensors (weights, KV pool,
    activations) and reserved by torch's allocator, beside the device's total, in GiB."""
    if engine.limits.device_type != "cuda":
        return {}
    import torch

    gib = 2**30
    return {
        "device_memory_gib": {
            "peak_allocated": round(torch.cuda.max_memory_allocated() / gib, 1),
            "peak_reserved": round(torch.cuda.max_memory_reserved() / gib, 1),
            "total": round(
                torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib, 1
            ),
        }
    }


def generation_time(counters: dict[str, float]) -> dict:
    """Where the fast engine's generation time went (empty for other engines and tasks):
    prefill seconds and tokens computed, decode seconds and steps, the rows a step carried on
    average and the share of the slots it computed that held a row (the rest idle in a
    bucket), and on a GPU the decode graphs captured and the seconds that took (within the
    decode seconds). Seconds are the host's clock around each call, which ends with its
    tokens on the host, so prefill and decode add up to the model time spent generating."""
    steps = counters.get("decode_steps", 0)
    if not steps and not counters.get("prefill_calls"):
        return {}
    out = {
        "prefill_seconds": round(counters.get("prefill_seconds", 0.0), 3),
        "prefill_tokens": int(counters.get("prefill_tokens", 0)),
        "decode_seconds": round(counters.get("decode_seconds", 0.0), 3),
        "decode_steps": int(steps),
    }
    if counters.get("graph_captures"):  # CUDA graphs captured for decode steps (GPU only)
        out["graph_captures"] = int(counters["graph_captures"])
        out["capture_seconds"] = round(counters["capture_seconds"], 3)
    if steps:
        rows = counters.get("decode_row_steps", 0)
        out["decode_rows_per_step"] = round(rows / steps, 1)
        out["decode_slots_filled"] = round(rows / counters["decode_slot_steps"], 3)
    return out


def write_summary(
    layout: OutputLayout, summary: Summary, inputs, plan, engine, host_seconds
) -> None:
    """summary.json, last: its presence (complete: true) is what marks the job done. The
    tokenized input's spill files go then: a finished job never reads them again."""
    summary.task, summary.device = inputs.task.name, engine.limits.device_name
    summary.details.update(host_seconds)
    summary.details.update(hardware_summary(summary, engine))
    summary.details.update(
        engine=engine.limits.kind, padding_fraction_file_order=padding_fraction(plan.file_order)
    )
    if engine.limits.quantization != "none":
        summary.details["quantization"] = engine.limits.quantization
    if engine.limits.kv_cache_dtype != "auto":
        summary.details["kv_cache_dtype"] = engine.limits.kv_cache_dtype
    shared = engine.counters.get("shared_prefix_tokens")
    if shared:  # prompt tokens whose keys and values were copied, not computed again
        summary.details["shared_prefix_tokens"] = int(shared)
    summary.details.update(generation_time(engine.counters))
    ahead = engine.counters.get("read_ahead_seconds")
    if ahead is not None:  # the weights read onto the device during set-up (read_ahead.py)
        summary.details["read_ahead_seconds"] = round(ahead, 3)
    summary.details.update(device_memory(engine))
    summary.write(layout.summary)
    shutil.rmtree(layout.prepared_dir, ignore_errors=True)
    log(
        f"finished: {counted(summary.rows_out, 'row')} in {layout.outputs_dir}",
        event="finish",
        json_only=True,
        **summary.to_dict(),
    )
    cut_short = summary.details.get("constrained_cut_short")
    if cut_short:
        log(
            f"{counted(cut_short, 'sample')} kept to a response_format "
            f"{'is not a whole, valid answer' if cut_short == 1 else 'are not whole, valid answers'}"
            " of it: ended at their token limit (finish_reason length; raise max_tokens, "
            "task.max_new_tokens) or at a stop string (task.stop) before the format was "
            "complete, or JSON that breaks its schema where the grammar library lets it through "
            "(a repeated key, an exclusive bound)",
            level="warning",
        )
    if log_format() == "plain" and not launched_worker():  # the launcher says the merged one
        say(format_summary(summary.to_dict()))


def say_merged(root: OutputLayout) -> None:
    """What a `--gpus` launcher says once its workers merged their shards: the job's summary
    and next steps, as a run of the whole job says them (each worker leaves out its own)."""
    summary = Summary.read_if_there(root.summary)
    if summary is None or log_format() != "plain":
        return
    say(format_summary(summary.to_dict()))
    log_next_steps(root, root.responses.exists())


def log_next_steps(layout: OutputLayout, responses: bool) -> None:
    """Where the results are and what to run next, at the end of a run."""
    outputs = f"{layout.outputs_dir}/" + (f" and {layout.responses}" if responses else "")
    lines = [
        ("outputs", outputs),
        ("summary", f"{layout.summary}; per batch: {layout.batch_stats}"),
        (
            "next",
            f"bulkinfer report {shlex.quote(str(layout.root))}  (writes {layout.report_page})",
        ),
    ]
    if log_format() == "plain":  # JSON logs: the finish event, last, holds the summary
        say("\n".join(f"  {name:<16} {text}" for name, text in lines))


def token_bytes_of_job(spec: dict):
    """The token id -> bytes of a recorded job's tokenizer (a merge writing an OpenAI job's
    responses), or None where it cannot be loaded now."""
    from bulkinfer.engines.constraints import token_bytes_of
    from bulkinfer.errors import UserError
    from bulkinfer.model_files import load_tokenizer, resolve_model_files
    from bulkinfer.spec import load_spec

    try:
        job = load_spec(None, data=json.loads(json.dumps(spec)))
        return token_bytes_of(load_tokenizer(resolve_model_files(job.model)))
    except UserError:
        return None


NAMED_SHARDS = 4  # shards not done named one by one, up to this many


def _say_shards_left(root: OutputLayout, shard: Shard, states, waiting) -> None:
    """A shard done before its siblings: how many are done, and which are not and why, so a
    job none of whose shards is still running (one stopped, failed, or its outputs damaged)
    does not end its last run silently unmerged."""
    if len(waiting) <= NAMED_SHARDS:
        names = ", ".join(f"{s.shard} ({s.state})" for s in waiting)
    else:  # an array of hundreds: counted by state
        names = ", ".join(
            f"{n:,} {state}" for state, n in Counter(s.state for s in waiting).items()
        )
    ended = [str(s.shard) for s in waiting if s.state in ("stopped", "failed")]
    advice = "; the last to finish merges"
    if ended:  # (pending ones may be waiting in a queue)
        more = f" and {len(ended) - NAMED_SHARDS:,} more" if len(ended) > NAMED_SHARDS else ""
        rerun = ", ".join(f"--shard {name}" for name in ended[:NAMED_SHARDS])
        advice = f"; rerun {rerun}{more}" + advice
    log(
        f"shard {shard} done; {len(states) - len(waiting):,} of {counted(shard.count, 'shard')} "
        "done, "
        f"not done: {names}{advice} (bulkinfer status {shlex.quote(str(root.root))})",
        event="shards",
        shards=shard.count,
        shards_done=len(states) - len(waiting),
    )


def merge_if_last(root: OutputLayout, shard: Shard) -> None:
    """The shard that finds every shard done merges them into OUT/outputs; not again where they
    are merged already (a finished shard run again, a requeued array task)."""
    from bulkinfer.state.merge import merge_shards
    from bulkinfer.state.status import outputs_merged, shard_states

    states = shard_states(root, shard.count)
    waiting = [s for s in states if s.state != "done"]
    if waiting:
        _say_shards_left(root, shard, states, waiting)
        return
    if outputs_merged(root, states):
        return
    with writes_reported(root):
        summary = merge_shards(root, token_bytes_of_job)
    if summary is None:  # a sibling finishing as this shard did merged them first
        return
    # (a --gpus launcher says the next steps after its summary)
    report = "" if launched_worker() else f"; next: bulkinfer report {shlex.quote(str(root.root))}"
    log(
        f"{'the one shard' if shard.count == 1 else f'all {shard.count:,} shards'} done: merged "
        f"{counted(summary.rows_out, 'row')} into "
        f"{root.outputs_dir}{report}",
        event="merge",
        shards=shard.count,
        rows_out=summary.rows_out,
    )
