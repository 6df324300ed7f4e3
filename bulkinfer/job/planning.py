"""The batches a job runs, and what `bulkinfer plan` prints of them: one function makes both, so
`plan` and `run` give the same batches for the same spec, input and device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bulkinfer.job.setup import Inputs
from bulkinfer.observe.progress import log
from bulkinfer.planner import (
    Batch,
    TokenBudget,
    assign_shards,
    length_counts,
    length_histogram,
    padding_fraction,
    plan_batches,
)
from bulkinfer.prepare import PreparedRows
from bulkinfer.prepare.prefixes import prefix_groups
from bulkinfer.prepare.rows import prepared_location
from bulkinfer.sharding import Shard


@dataclass(frozen=True)
class JobPlan:
    """The rows this process answers for and their batches, sorted and (for comparison) in
    file order."""

    budget: TokenBudget
    rows: np.ndarray  # every row of this shard (or job), runnable or not
    runnable: np.ndarray
    batches: list[Batch]
    file_order: list[Batch]


# How a packed generation plan orders its rows: "steps" (most decode steps first, then longest
# prompt) since job.json records it; folders planned before that keep "length" on resume.
PLAN_ORDER = "steps"
AUTO_PLAN_TOKENS = 2_000_000


def make_plan(
    inputs: Inputs, budget: TokenBudget, shard: Shard | None = None, order: str = PLAN_ORDER
) -> JobPlan:
    """Sorted, token-budget-packed batches of the rows this shard runs."""
    prepared = inputs.prepared
    mine = shard_rows(prepared, inputs.task.new_tokens_per_row(), shard)
    runnable = prepared.runnable_rows()
    if shard is not None:
        runnable = np.intersect1d(runnable, mine)
    sort = inputs.setup.spec.batching.sort == "length"
    costs = inputs.task.row_costs(prepared) if budget.packed else None
    steps = inputs.task.row_steps(prepared) if budget.packed and order == "steps" else None
    groups = None
    if budget.packed and steps is None and prepared.prefix_heads is not None:
        groups = prefix_groups(
            prepared.prefix_heads, prepared.prefix_shared, runnable, prepared.prefix_length
        ).labels
    batches = plan_batches(runnable, prepared.lengths, budget, sort, costs, steps, groups)
    file_order = plan_batches(runnable, prepared.lengths, budget, False, costs)
    return JobPlan(budget, mine, runnable, batches, file_order)


def shard_rows(prepared: PreparedRows, new_tokens_per_row: int, shard: Shard | None) -> np.ndarray:
    """The input rows this process answers for: all of them, or its shard's, balanced by tokens."""
    if shard is None:
        return np.arange(prepared.num_rows)
    costs = prepared.lengths + new_tokens_per_row
    return np.flatnonzero(assign_shards(costs, shard.count) == shard.index)


def row_work(inputs: Inputs) -> np.ndarray:
    """Each row's planned tokens (the ETA's unit): its prompt plus the new tokens it may take,
    for each of its n sequences, as the tokens a generation reports come from all n (counted
    once, the work ran out at a third of a job of n: 3 and the ETA read 0)."""
    return inputs.task.row_costs(inputs.prepared)


def job_size(inputs: Inputs, limits, shard: Shard | None = None) -> tuple[int, int | None]:
    """What `model.engine: auto` weighs against compiling the fast engine: the tokens this
    shard's (or job's) runnable rows hold on a packing engine, and for generation the decode
    steps the reference engine's plan would run (each batch as many as its longest-asked row).
    A job of over AUTO_PLAN_TOKENS is not planned twice: it is large by any measure."""
    from bulkinfer.job.budget import token_budget

    prepared, task = inputs.prepared, inputs.task
    rows = prepared.runnable_rows()
    if shard is not None:
        rows = np.intersect1d(rows, shard_rows(prepared, task.new_tokens_per_row(), shard))
    tokens = int(task.row_costs(prepared)[rows].sum())
    steps = task.row_steps(prepared)
    if steps is None or limits.kind != "fast" or tokens > AUTO_PLAN_TOKENS:
        return tokens, None
    spec = inputs.setup.spec
    reference = limits.as_reference()
    budget = token_budget(spec.batching, reference, inputs.setup.config, task.new_tokens_per_row())
    plan = make_plan(inputs, budget, shard)
    return tokens, sum(int(steps[b.rows].max()) for b in plan.batches if len(b.rows))


def plan_facts(prepared: PreparedRows, plan: JobPlan) -> dict:
    """What job.json keeps of the plan, so `bulkinfer report` shows it before the job ends: the
    token-length histogram (fixed buckets, so shards add up), planned batches, padded tokens
    sorted and in file order, and whether the lengths are of prompts after the chat template."""
    runnable = plan.runnable
    return {
        "batches": len(plan.batches),
        "rows": len(plan.rows),
        "row_errors": len(plan.rows) - len(runnable),
        "input_tokens": int(prepared.lengths[runnable].sum()) if len(runnable) else 0,
        "padded_tokens": sum(b.padded_tokens for b in plan.batches),
        "padded_tokens_file_order": sum(b.padded_tokens for b in plan.file_order),
        "length_histogram": length_counts(prepared.lengths[runnable]),
        "chat_template": prepared.chat_template,
        "shared_prefixes": shared_prefixes(prepared, runnable, plan.budget.packed),
    }


def most_samples(task, prepared: PreparedRows, rows: np.ndarray) -> int:
    """The most sequences a row of `rows` generates (n); 1 for a task that samples nothing."""
    samples = getattr(task, "row_samples", None)
    if samples is None or not len(rows):
        return 1
    return int(samples(prepared)[rows].max())


def plan_report(inputs: Inputs, plan: JobPlan) -> dict:
    """What `bulkinfer plan` prints: rows, length histogram, batches, padding file order vs
    sorted, and each batch's rows (so a run's job.json can be compared with it)."""
    prepared = inputs.prepared
    rows = plan.runnable
    lengths = prepared.lengths[rows]
    return {
        "rows": prepared.num_rows,
        "runnable_rows": int(len(rows)),
        "row_errors": len(prepared.row_errors),
        "input_tokens": int(lengths.sum()) if len(rows) else 0,
        "max_tokens": plan.budget.max_tokens,
        "max_batch_size": plan.budget.max_batch_size,
        "new_tokens_per_row": plan.budget.new_tokens_per_row,
        "samples_per_row": most_samples(inputs.task, prepared, rows),
        "histogram": length_histogram(lengths),
        "sorted": inputs.setup.spec.batching.sort == "length",
        "batches_sorted": len(plan.batches),
        "batches_file_order": len(plan.file_order),
        "padding_sorted": padding_fraction(plan.batches),
        "padding_file_order": padding_fraction(plan.file_order),
        "lengths": {
            "min": int(lengths.min()) if len(rows) else 0,
            "median": float(np.median(lengths)) if len(rows) else 0,
            "max": int(lengths.max()) if len(rows) else 0,
        },
        "batch_rows": [len(b.rows) for b in plan.batches],
        # where each row is (file:line), not its position: a row's id may be another number
        "example_errors": [
            (prepared_location(prepared, row), message)
            for row, message in sorted(prepared.row_errors.items())[:5]
        ],
        "shared_prefixes": shared_prefixes(prepared, rows, plan.budget.packed),
    }


def shared_prefixes(
    prepared: PreparedRows, rows: np.ndarray, fast: bool, top: int = 5
) -> dict | None:
    """The prefix groups among `rows`: how many, the rows in them, the largest ones, and the
    prompt tokens each prefix computed once would save (None where no row is long enough);
    `engine`: which engine runs the job (`fast` saves them, `reference` computes rows whole)."""
    if prepared.prefix_heads is None or not len(rows):
        return None
    groups = prefix_groups(
        prepared.prefix_heads, prepared.prefix_shared, rows, prepared.prefix_length
    )
    prompt_tokens = int(prepared.lengths[rows].sum())
    return {
        "min_tokens": prepared.prefix_length,
        "engine": "fast" if fast else "reference",
        "groups": len(groups.rows),
        "rows": int(groups.rows.sum()),
        "saved_tokens": groups.saved_tokens,
        "saved_share": groups.saved_tokens / prompt_tokens if prompt_tokens else 0.0,
        "largest": [
            {"prefix_tokens": int(t), "rows": int(n)}
            for t, n in zip(groups.prefix_tokens[:top], groups.rows[:top], strict=True)
        ],
    }


def warn_rows_over_budget(inputs: Inputs, plan: JobPlan, where: str = "") -> None:
    """Rows longer than a batch's token budget run one to a batch, over it: say how many (run
    and plan both say it, before any batch)."""
    budget = plan.budget
    need = inputs.prepared.lengths[plan.runnable].astype(np.int64) + budget.new_tokens_per_row
    over = int(np.sum(need > budget.max_tokens))
    if over:
        new = f" plus {budget.new_tokens_per_row:,} new tokens" if budget.new_tokens_per_row else ""
        log(
            f"{where}{over:,} row{'s need' if over > 1 else ' needs'} more than the budget of "
            f"{budget.max_tokens:,} tokens a batch (prompt{new}, up to {int(need.max()):,}) "
            "and run one to a batch, over it; raise batching.max_tokens (or auto) if memory "
            "allows",
            level="warning",
        )


def plan_job(spec) -> dict:
    """`bulkinfer plan`: the job's batches on this device, as `run` would plan them (the same
    budget, from the engine's limits known before loading), with no weights loaded."""
    from bulkinfer.engines.select import by_job_size, config_blocker
    from bulkinfer.job.budget import token_budget
    from bulkinfer.job.loading import planned_engine
    from bulkinfer.job.setup import check_no_failed_rows, log_request_caveats, set_up, tokenize

    setup = set_up(spec)
    inputs = tokenize(setup)
    if spec.on_error == "fail":  # run stops on such a row before any batch: so does its plan
        check_no_failed_rows(inputs.prepared)
    log_request_caveats(inputs.prepared, spec.task)
    options, limits = planned_engine(setup.model, setup.config, setup.task, convert=False)
    limits, _ = by_job_size(limits, options, setup.config, *job_size(inputs, limits))
    new_tokens = setup.task.new_tokens_per_row()
    budget = token_budget(spec.batching, limits, setup.config, new_tokens)
    plan = make_plan(inputs, budget)
    warn_rows_over_budget(inputs, plan)
    report = plan_report(inputs, plan)
    if report["shared_prefixes"] is not None:  # whether model.engine: fast would share them
        report["shared_prefixes"]["fast_possible"] = config_blocker(setup.config) is None
    return {**report, "engine": {**limits.to_dict(), "task": setup.task.name}}
