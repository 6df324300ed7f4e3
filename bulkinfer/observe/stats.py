"""Throughput accounting: per-batch figures and the job summary built from them."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

from bulkinfer.configs import text_config
from bulkinfer.errors import counted

# Dense bf16 tensor FLOP/s and memory bandwidth from the vendors' datasheets, matched against
# the device name in order (first match wins). The lent H100s measured 780-790 TFLOP/s on a
# large bf16 matrix product, so about 0.8 of these peaks is the practical ceiling.
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100-SXM4-80GB", 312e12, 2.04e12),
    ("A100", 312e12, 1.56e12),
    ("L40S", 362e12, 0.864e12),
    ("L4", 121e12, 0.3e12),
)


def device_peaks(device_name: str) -> tuple[float, float] | None:
    """(peak bf16 FLOP/s, bytes/s) of a known GPU, or None (a CPU, an unknown device)."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key in device_name:
            return flops, bandwidth
    return None


@dataclass(frozen=True)
class ModelCost:
    """What a token costs a model on a device: 2 x params FLOPs, the weights read once per
    decode step, the KV cache bytes per token of context; and the device's peaks."""

    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    peaks: tuple[float, float] | None

    @classmethod
    def of(cls, engine) -> ModelCost:
        """The cost of an engine's model (`engines.base.CausalEngine` or `EncoderEngine`) on
        the device its limits name."""
        model = engine.model
        config = text_config(model.config)
        # model.quantization: fp8 keeps the decoder's linear weights as buffers (engines/fp8.py)
        weights = [*model.parameters()] + [
            b for name, b in model.named_buffers() if name.endswith(".weight")
        ]
        params = sum(w.numel() for w in weights)
        weight_bytes = sum(w.numel() * w.element_size() for w in weights)
        limits = engine.limits
        width = 1 if limits.kv_cache_dtype == "fp8" else next(model.parameters()).element_size()
        heads = getattr(config, "num_attention_heads", 0) or 1
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = getattr(config, "num_hidden_layers", 0) or 0
        kv = 2 * layers * kv_heads * head_dim * width
        peaks = device_peaks(limits.device_name)
        if peaks is not None and limits.quantization == "fp8":  # fp8 products: twice bf16's rate
            peaks = (2 * peaks[0], peaks[1])
        return cls(params, weight_bytes, kv, peaks)

    def fractions(
        self, prompt_tokens: int, new_tokens: int, rows: int, seconds: float, in_flight: float
    ) -> dict:
        """Fraction of peak FLOP/s reached (2 x params per prompt and new token), and for
        generation of the decode roofline: per step the weights once plus each row in flight's
        KV cache (mean context: its prompt and half its new tokens), at the memory bandwidth."""
        if self.peaks is None or seconds <= 0:
            return {}
        flops, bandwidth = self.peaks
        total = prompt_tokens + new_tokens
        out = {"peak_flops_fraction": 2 * self.params * total / seconds / flops}
        if new_tokens and rows and in_flight:
            context = (prompt_tokens + new_tokens / 2) / rows
            step_bytes = self.weight_bytes + in_flight * context * self.kv_bytes_per_token
            roofline = in_flight * bandwidth / step_bytes
            out["decode_roofline_fraction"] = new_tokens / seconds / roofline
        return out


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
    splits: int = 0  # halvings: out of memory, or to find the rows that fail
    ended_at: float | None = None
    # on a known GPU (DEVICE_PEAKS); None elsewhere
    peak_flops_fraction: float | None = None
    decode_roofline_fraction: float | None = None
    # samples kept to a response_format that reached their token limit first (not valid)
    constrained_cut_short: int | None = None
    # of the splits, those for out of memory (None in folders written before it was kept)
    oom_splits: int | None = None

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
        ("peak_flops_fraction", pa.float64()),
        ("decode_roofline_fraction", pa.float64()),
        ("constrained_cut_short", pa.int64()),
        ("oom_splits", pa.int64()),
        ("run", pa.string()),
    ]
)


def stats_table(records: list[tuple[str, dict]]) -> pa.Table:
    """One row per batch, from (run id, BatchStats dict) pairs, in batch order."""
    rows = sorted(records, key=lambda r: r[1]["batch"])
    columns = {name: [] for name in STATS_SCHEMA.names}
    known = {f.name for f in fields(BatchStats)}
    for run, s in rows:  # a figure a later version records is left out, not a failure
        stats = BatchStats(**{k: v for k, v in s.items() if k in known})
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
    model_seconds = float(sum(s["seconds"] for s in stats))  # a float with no batch too
    input_tokens = sum(s["real_tokens"] for s in stats)
    padded = sum(s["padded_tokens"] for s in stats)
    output_tokens = sum(s["new_tokens"] for s in stats)
    wall = max(wall_seconds, 1e-9)
    cut_short = [
        s["constrained_cut_short"] for s in stats if s.get("constrained_cut_short") is not None
    ]
    constrained = {"constrained_cut_short": sum(cut_short)} if cut_short else {}
    return {
        **constrained,
        "complete": True,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_by_status": rows_by_status,
        # a batch committed in pieces (checkpoint.every_seconds, a resume) counts once
        "batches": len({s.get("batch", -1 - i) for i, s in enumerate(stats)}),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "padded_tokens": padded,
        "padding_fraction": 0.0 if padded == 0 else 1.0 - input_tokens / padded,
        "wall_seconds": wall_seconds,
        "model_seconds": model_seconds,
        "model_share_of_wall": model_seconds / wall,
        "seconds_outside_model": max(0.0, wall_seconds - model_seconds),
        "rows_per_second": rows_out / wall,
        "input_tokens_per_second": input_tokens / wall,
        "output_tokens_per_second": output_tokens / wall,
        # a batch recorded before its out-of-memory splits were kept apart: all its splits
        "oom_splits": sum(_or(s.get("oom_splits"), s.get("splits", 0)) for s in stats),
    }


def _or(value, default):
    return default if value is None else value


def _rate(per_second: float) -> str:
    """A rate as the summary prints it: whole above 10, a tenth below (a tiny job's 0.4 is not 0)."""
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.1f}"


def format_summary(summary: dict) -> str:
    """A short table for the terminal."""
    counts = summary["rows_by_status"]  # ok first (a merged summary's are sorted by name)
    status = ", ".join(f"{k} {counts[k]:,}" for k in sorted(counts, key=lambda k: k != "ok"))
    lines = [
        ("rows", f"{summary['rows_out']:,} of {summary['rows_in']:,} ({status})"),
        ("device", summary["device"]),
        (
            "wall time",
            f"{summary['wall_seconds']:.1f} s"
            + (f", the slowest of {summary['shards']} shards" if summary.get("shards") else "")
            + f" (model {summary['model_seconds']:.1f} s)",
        ),
        ("rows/s", f"{summary['rows_per_second']:,.2f}"),
        ("input tokens/s", _rate(summary["input_tokens_per_second"])),
        ("output tokens/s", _rate(summary["output_tokens_per_second"])),
        (
            "padding",
            f"{summary['padding_fraction']:.1%} of {summary['padded_tokens']:,} padded prompt tokens"
            f" ({summary.get('padding_fraction_file_order', 0):.1%} in file order)",
        ),
        # (batches.parquet's `splits` also counts the halvings that find a failing row)
        (
            "batches",
            f"{summary['batches']:,} ({counted(summary['oom_splits'], 'out-of-memory split')})",
        ),
    ]
    if "decode_steps" in summary:  # the fast engine's generation: where the model time went
        rows = summary.get("decode_rows_per_step")  # a shard's own (not in a merged summary)
        steps = f"{summary['decode_steps']:,} steps" + (
            f" of {rows:,.1f} rows on average" if rows else ""
        )
        lines.append(
            (
                "generation",
                f"prefill {summary['prefill_seconds']:.1f} s ({summary['prefill_tokens']:,} "
                f"tokens), decode {summary['decode_seconds']:.1f} s ({steps})",
            )
        )
    if summary.get("constrained_cut_short"):
        lines.append(
            (
                "cut short",
                f"{summary['constrained_cut_short']:,} samples kept to a response_format are "
                "not whole, valid answers of it (cut at their token limit or by a stop string, "
                "or JSON breaking its schema): see the warning of the run",
            )
        )
    if "peak_flops_fraction" in summary:
        hardware = f"{summary['peak_flops_fraction']:.1%} of peak FLOP/s"
        if "decode_roofline_fraction" in summary:
            hardware += f", {summary['decode_roofline_fraction']:.1%} of the decode roofline"
        lines.append(("hardware", hardware))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


def imports_seconds(started: float) -> float | None:
    """Seconds from the process's start to `started` (a time.monotonic() reading): the
    interpreter and the imports before the run began. None where /proc is not there."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age_now = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return round(max(0.0, age_now - (time.monotonic() - started)), 3)
