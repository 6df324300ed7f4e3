"""The report's figures: the data series from the job's facts, drawn by matplotlib as PNG files.

matplotlib is an optional extra (`pip install 'bulkinfer[report]'`); without it the page draws
the same series itself as inline SVG (svg.py), so the report never needs more than the core.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from bulkinfer.observe.report.facts import JobFacts

STATE_COLOURS = {
    "done": "#2e7d32",
    "running": "#1565c0",
    "incomplete": "#ef6c00",
    "stopped": "#ef6c00",
    "pending": "#9e9e9e",
    "failed": "#c62828",
}
SERIES_COLOURS = ("#1565c0", "#ef6c00", "#2e7d32")


@dataclass(frozen=True)
class Series:
    label: str
    x: list[float]
    y: list[float]


@dataclass(frozen=True)
class Chart:
    """One figure's content, independent of how it is drawn.

    kind: `bars` (x = bucket lows, widths = bucket widths, log x axis), `lines`, `points`
    (scatter with reference lines), `hbars` (one bar per label, 0..1, coloured by state)."""

    name: str
    title: str
    kind: str
    x_label: str
    y_label: str
    series: list[Series]
    widths: list[float] = field(default_factory=list)
    references: list[tuple[str, float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_x: bool = False
    percent_y: bool = False
    x_range: tuple[float, float] | None = None  # the x axis's span, where the data's is not it


def charts(facts: JobFacts) -> list[Chart]:
    """Every chart the facts allow: a chart with nothing to show is left out, not drawn empty."""
    found = [
        lengths_chart(facts),
        throughput_chart(facts),
        padding_chart(facts),
        shards_chart(facts),
    ]
    return [c for c in found if c is not None]


def lengths_chart(facts: JobFacts) -> Chart | None:
    histogram = (facts.plan or {}).get("length_histogram") or []
    histogram = [(max(lo, 1), hi, n) for lo, hi, n in histogram]
    if not histogram:
        return None
    return Chart(
        name="lengths",
        title="Prompt length (tokens)",
        kind="bars",
        x_label="prompt tokens",
        y_label="rows",
        series=[Series("rows", [lo for lo, _, _ in histogram], [n for _, _, n in histogram])],
        widths=[hi + 1 - lo for lo, hi, _ in histogram],
        log_x=True,
    )


def throughput_chart(facts: JobFacts, bins: int = 60) -> Chart | None:
    """Tokens per second of the whole job over wall time: each batch's tokens spread over the
    seconds it ran, summed across shards, in `bins` equal slices. The axis spans the whole job,
    from its start to its end, so the start-up before the first batch and the finishing after
    the last show as the time they took."""
    batches = facts.batches
    if not batches:
        return None
    starts, ends = batch_spans(batches, facts.has_timestamps)
    t0, t1 = float(starts.min()), float(ends.max())
    timeline = facts.timeline if facts.has_timestamps else None
    if timeline is not None:
        t0, t1 = min(t0, timeline[0]), max(t1, timeline[1])
    if not t1 - t0 > 0:  # no time measured (zero seconds): no rate to draw
        return None
    span = t1 - t0
    edges = np.linspace(t0, t1, min(bins, max(len(batches), 8)) + 1)
    width = edges[1] - edges[0]
    prompt = np.array([b["real_tokens"] for b in batches], dtype=float)
    generated = np.array([b["new_tokens"] for b in batches], dtype=float)
    duration = np.maximum(ends - starts, 1e-9)
    overlap = np.clip(
        np.minimum(ends[:, None], edges[None, 1:]) - np.maximum(starts[:, None], edges[None, :-1]),
        0,
        None,
    )
    share = overlap / duration[:, None]
    unit, scale = _time_unit(span)
    x = ((edges[:-1] + edges[1:]) / 2 - t0) / scale
    series = [Series("prompt tokens/s", x.tolist(), (prompt @ share / width).tolist())]
    if generated.sum() > 0:
        series.append(
            Series("generated tokens/s", x.tolist(), (generated @ share / width).tolist())
        )
    notes = []
    if not facts.has_timestamps:
        notes.append("no batch timestamps in this folder:\nbatches drawn back to back")
    return Chart(
        name="throughput",
        title="Throughput over time",
        kind="lines",
        x_label=f"{unit} since the " + ("job started" if timeline else "first batch started"),
        y_label="tokens / s",
        series=series,
        notes=notes,
        x_range=(0.0, span / scale),
    )


def batch_spans(batches: list[dict], timestamps: bool) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every batch: from its end time and duration, or, in folders without
    timestamps, back to back per shard."""
    seconds = np.array([b["seconds"] for b in batches], dtype=float)
    if timestamps:
        ends = np.array([b["ended_at"] for b in batches], dtype=float)
        return ends - seconds, ends
    ends = np.zeros(len(batches))
    clock: dict[int, float] = {}
    for i, b in sorted(enumerate(batches), key=lambda p: (p[1].get("shard", 0), p[1]["batch"])):
        shard = b.get("shard", 0)
        clock[shard] = clock.get(shard, 0.0) + seconds[i]
        ends[i] = clock[shard]
    return ends - seconds, ends


def _time_unit(span: float) -> tuple[str, float]:
    if span > 3 * 3600:
        return "hours", 3600.0
    if span > 180:
        return "minutes", 60.0
    return "seconds", 1.0


def padding_chart(facts: JobFacts) -> Chart | None:
    """Padding of each batch in run order, against the whole plan sorted and in file order."""
    batches = sorted(facts.batches, key=lambda b: (b.get("shard", 0), b["batch"]))
    batches = [b for b in batches if b["padded_tokens"] > 0]
    if not batches:
        return None
    padding = [1 - b["real_tokens"] / b["padded_tokens"] for b in batches]
    references = []
    sorted_fraction, file_order = padding_fractions(facts)
    if sorted_fraction is not None:
        references.append(("whole job, sorted and packed", sorted_fraction))
    if file_order is not None:
        references.append(("whole job in file order", file_order))
    return Chart(
        name="padding",
        title="Padding per batch (share of padded prompt tokens)",
        kind="points",
        x_label="batch, in the order run" + (" (shard by shard)" if facts.sharded else ""),
        y_label="padding",
        series=[Series("batches", list(range(len(batches))), padding)],
        references=references,
        percent_y=True,
    )


def padding_fractions(facts: JobFacts) -> tuple[float | None, float | None]:
    """Padding of the whole job, sorted and packed and in file order (None where unknown)."""
    summary, plan = facts.summary or {}, facts.plan or {}
    sorted_fraction = summary.get("padding_fraction")
    file_order = summary.get("padding_fraction_file_order")
    if plan.get("padded_tokens"):
        real = plan["input_tokens"]
        if sorted_fraction is None:
            sorted_fraction = 1 - real / plan["padded_tokens"]
        if file_order is None and plan.get("padded_tokens_file_order"):
            file_order = 1 - real / plan["padded_tokens_file_order"]
    padded = sum(b["padded_tokens"] for b in facts.batches)
    if sorted_fraction is None and padded:  # the plan is not known yet: the batches run so far
        sorted_fraction = 1 - sum(b["real_tokens"] for b in facts.batches) / padded
    return sorted_fraction, file_order


def shards_chart(facts: JobFacts) -> Chart | None:
    if not facts.sharded:
        return None
    done = [
        (s.rows_done / s.rows_total if s.rows_total else (1.0 if s.state == "done" else 0.0))
        for s in facts.shards
    ]
    return Chart(
        name="shards",
        title="Progress per shard",
        kind="hbars",
        x_label="share of the shard's rows done",
        y_label="shard",
        series=[Series("done", list(range(len(done))), done)],
        labels=[str(s.shard) for s in facts.shards],
        colours=[STATE_COLOURS.get(s.state, "#9e9e9e") for s in facts.shards],
    )


def draw_png(chart: Chart) -> bytes | None:
    """`chart` as PNG bytes drawn by matplotlib; None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return None
    height = 3.6 if chart.kind != "hbars" else min(1.2 + 0.28 * len(chart.labels), 16)
    fig = Figure(figsize=(8, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, chart)
    ax.set_title(chart.title, loc="left", fontsize=11)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    if chart.percent_y:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw(ax, chart: Chart) -> None:
    from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter

    first = chart.series[0]
    if chart.kind == "bars":
        ax.bar(first.x, first.y, width=chart.widths, align="edge", color=SERIES_COLOURS[0])
        ax.set_xscale("log")
        low, high = first.x[0], first.x[-1] + chart.widths[-1]
        ticks = log_ticks(low, high)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(low / 1.1, high * 1.1)
    elif chart.kind == "lines":
        for series, colour in zip(chart.series, SERIES_COLOURS, strict=False):
            ax.plot(series.x, series.y, label=series.label, color=colour, drawstyle="steps-mid")
        ax.set_ylim(bottom=0)
        if chart.x_range is not None:
            ax.set_xlim(*chart.x_range)
        if len(chart.series) > 1:
            _legend_below(ax)
    elif chart.kind == "points":
        ax.scatter(first.x, first.y, s=12, color=SERIES_COLOURS[0], label="one batch")
        ax.set_xlim(-0.5, max(first.x) + 0.5)
        if len(first.x) <= 12:
            ax.set_xticks(first.x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for (label, value), colour in zip(chart.references, SERIES_COLOURS[1:], strict=False):
            ax.axhline(value, color=colour, linestyle="--", label=f"{label}: {value:.1%}")
        top = max([*first.y, *(v for _, v in chart.references), 0.01])
        ax.set_ylim(0, min(1.0, top * 1.15))
        _legend_below(ax)
    elif chart.kind == "hbars":
        positions = list(range(len(chart.labels)))
        ax.barh(positions, [1.0] * len(positions), color="#eeeeee")
        ax.barh(positions, first.y, color=chart.colours)
        ax.set_yticks(positions, chart.labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if chart.notes:
        ax.set_title("\n".join(chart.notes), loc="right", fontsize=8, color="#666666")


def _legend_below(ax) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)


def log_ticks(low: float, high: float) -> list[int]:
    """1, 2, 3, 5 x 10^k ticks inside [low, high]: round numbers a reader takes in at a glance."""
    ticks = [m * 10**k for k in range(0, 8) for m in (1, 2, 3, 5) if low <= m * 10**k <= high]
    return ticks if len(ticks) >= 2 else sorted({max(int(low), 1), max(int(high), 1)})
