"""Throughput accounting: per-batch figures and the job summary built from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa


@dataclass(frozen=True)
class BatchStats:
    """What one batch cost: rows, real and padded prompt tokens, new tokens, seconds; and when it
    ended (Unix time; None in folders written before it was recorded), for throughput over time."""

    batch: int
    rows: int
    real_tokens: int
    padded_tokens: int
    new_tokens: int
    seconds: float
    failed_rows: int = 0
    splits: int = 0
    ended_at: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return (self.real_tokens + self.new_tokens) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


STATS_SCHEMA = pa.schema(
    [
        ("batch", pa.int64()),
        ("rows", pa.int64()),
        ("real_tokens", pa.int64()),
        ("padded_tokens", pa.int64()),
        ("new_tokens", pa.int64()),
        ("seconds", pa.float64()),
        ("tokens_per_second", pa.float64()),
        ("failed_rows", pa.int64()),
        ("splits", pa.int64()),
        ("ended_at", pa.float64()),
        ("run", pa.string()),
    ]
)


def stats_table(records: list[tuple[str, dict]]) -> pa.Table:
    """One row per batch, from (run id, BatchStats dict) pairs, in batch order."""
    rows = sorted(records, key=lambda r: r[1]["batch"])
    columns = {name: [] for name in STATS_SCHEMA.names}
    for run, s in rows:
        stats = BatchStats(**s)
        for name in STATS_SCHEMA.names:
            if name == "run":
                columns[name].append(run)
            elif name == "tokens_per_second":
                columns[name].append(stats.tokens_per_second)
            else:
                columns[name].append(getattr(stats, name))
    return pa.table(columns, schema=STATS_SCHEMA)


def summarize(
    stats: list[dict],
    rows_in: int,
    rows_out: int,
    rows_by_status: dict[str, int],
    wall_seconds: float,
) -> dict:
    """The numbers people read in the morning; rates use model time and wall time both."""
    model_seconds = sum(s["seconds"] for s in stats)
    input_tokens = sum(s["real_tokens"] for s in stats)
    padded = sum(s["padded_tokens"] for s in stats)
    output_tokens = sum(s["new_tokens"] for s in stats)
    wall = max(wall_seconds, 1e-9)
    return {
        "complete": True,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_by_status": rows_by_status,
        "batches": len(stats),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "padded_tokens": padded,
        "padding_fraction": 0.0 if padded == 0 else 1.0 - input_tokens / padded,
        "wall_seconds": wall_seconds,
        "model_seconds": model_seconds,
        "model_share_of_wall": model_seconds / wall,
        "rows_per_second": rows_out / wall,
        "input_tokens_per_second": input_tokens / wall,
        "output_tokens_per_second": output_tokens / wall,
        "oom_splits": sum(s.get("splits", 0) for s in stats),
    }


def format_summary(summary: dict) -> str:
    """A short table for the terminal."""
    status = ", ".join(f"{k} {v}" for k, v in summary["rows_by_status"].items())
    lines = [
        ("rows", f"{summary['rows_out']:,} of {summary['rows_in']:,} ({status})"),
        ("device", summary["device"]),
        ("wall time", f"{summary['wall_seconds']:.1f} s (model {summary['model_seconds']:.1f} s)"),
        ("rows/s", f"{summary['rows_per_second']:,.2f}"),
        ("input tokens/s", f"{summary['input_tokens_per_second']:,.0f}"),
        ("output tokens/s", f"{summary['output_tokens_per_second']:,.0f}"),
        (
            "padding",
            f"{summary['padding_fraction']:.1%} of {summary['padded_tokens']:,} padded prompt tokens"
            f" ({summary.get('padding_fraction_file_order', 0):.1%} in file order)",
        ),
        ("batches", f"{summary['batches']:,} ({summary['oom_splits']} out-of-memory splits)"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)
