"""The report page: one self-contained HTML file (inline CSS, figures as data URIs or inline
SVG), readable offline, mailed around, or opened from a cluster's shared disk."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from bulkinfer.errors import counted
from bulkinfer.io.layout import OutputLayout
from bulkinfer.observe.report.charts import STATE_COLOURS, padding_fractions
from bulkinfer.observe.report.facts import JobFacts
from bulkinfer.state.records import read_json

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #212121;
       margin: 0; background: #fafafa; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; border-bottom: 1px solid #e0e0e0; padding-bottom: 4px; }
.sub { color: #616161; font-size: 13px; margin-bottom: 16px; overflow-wrap: anywhere; }
.state { display: inline-block; color: white; border-radius: 4px; padding: 2px 10px;
         font-size: 14px; vertical-align: middle; margin-left: 8px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 10px; }
.card { background: white; border: 1px solid #e0e0e0; border-radius: 6px; padding: 10px 12px; }
.card .k { color: #616161; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; margin-top: 2px; }
.card .n { color: #757575; font-size: 12px; margin-top: 2px; overflow-wrap: anywhere; }
table { border-collapse: collapse; background: white; font-size: 14px; }
th, td { border: 1px solid #e0e0e0; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.msg { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; max-width: 760px;
         word-break: break-word; }
figure { margin: 12px 0; background: white; border: 1px solid #e0e0e0; border-radius: 6px;
         padding: 8px; }
figure img, figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: #616161; font-size: 13px; margin-top: 4px; }
.note { color: #616161; font-size: 13px; }
"""


def render_page(facts: JobFacts, figures: dict[str, tuple[str, str]], note: str = "") -> str:
    """figures: chart name -> (the <img> or <svg> markup, caption)."""
    title = f"bulkinfer report: {facts.root.name}"
    body = [
        f"<h1>{escape(title)}{_state_badge(facts.state)}</h1>",
        f'<div class="sub">{escape(str(facts.root.resolve()))} &middot; written '
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}</div>",
        _failure(facts),
        _cards(facts),
        "<h2>Rows by status</h2>",
        _status_table(facts),
        _errors_table(facts),
        "<h2>Input token lengths</h2>",
        _figure(figures, "lengths", "no token lengths recorded in this folder"),
        "<h2>Throughput over time</h2>",
        _figure(figures, "throughput", _no_batch(facts)),
        "<h2>Padding</h2>",
        _padding_text(facts),
        _figure(figures, "padding", _no_batch(facts)),
    ]
    if facts.sharded:
        body += ["<h2>Shards</h2>", _shards_table(facts), _figure(figures, "shards", "")]
    if note:
        body.append(f'<p class="note">{escape(note)}</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def _failure(facts: JobFacts) -> str:
    """Why a job that is not sharded failed (a sharded job's table says it for each shard)."""
    if facts.state != "failed" or facts.shards:
        return ""
    error = (read_json(OutputLayout(facts.root).failed) or {}).get("error")
    return (
        f'<p class="note">The last run stopped on an error: {escape(str(error))}</p>'
        if error
        else ""
    )


def _state_badge(state: str) -> str:
    colour = STATE_COLOURS.get(state, "#757575")
    return f'<span class="state" style="background:{colour}">{escape(state)}</span>'


def key_figures(facts: JobFacts) -> list[tuple[str, str, str]]:
    """(label, value, note) for the cards at the top: the summary, or what exists so far."""
    s = facts.summary or {}
    batches = facts.batches
    prompt = sum(b["real_tokens"] for b in batches)
    generated = sum(b["new_tokens"] for b in batches)
    model_seconds = sum(b["seconds"] for b in batches)
    ran = [seconds for seconds in facts.run_seconds if seconds > 0]
    # shards run side by side: the wall is the longest one's, the model's share is of them all
    wall = s.get("wall_seconds") or max(ran, default=0) or _wall_from_batches(facts)
    wall = wall or model_seconds
    busy = sum(ran) if facts.sharded and ran else wall
    total = facts.rows_total
    if facts.state == "done":
        rows_note = "all rows"
    elif total:
        rows_note = f"{_share(facts.rows_done, total)} done"
    elif facts.sharded:
        rows_note = "total known once every shard has started"
    else:
        rows_note = "total known once the input is read"
    errors = facts.rows_by_status.get("error", 0)
    sorted_padding, file_padding = padding_fractions(facts)
    cards = [
        (
            "rows",
            f"{facts.rows_done:,} of {total:,}" if total else f"{facts.rows_done:,} of ?",
            rows_note,
        ),
        (
            "ok / error",
            f"{facts.rows_by_status.get('ok', 0):,} / {errors:,}",
            _share(errors, facts.rows_done) + " errors",
        ),
        (
            # shards run side by side, or one after another in a queue: the slowest one's
            "wall time, slowest shard" if facts.sharded else "wall time",
            _duration(wall),
            f"model {_duration(model_seconds)} ({_share(model_seconds, busy)}"
            + (" of the shards' seconds)" if busy != wall else ")"),
        ),
        ("rows / s", f"{facts.rows_done / wall:,.2f}" if wall else "-", "over wall time"),
        ("prompt tokens", f"{prompt:,}", f"{prompt / wall:,.0f} / s" if wall else ""),
        ("generated tokens", f"{generated:,}", f"{generated / wall:,.0f} / s" if wall else ""),
        (
            "padding",
            f"{sorted_padding:.1%}" if sorted_padding is not None else "-",
            f"{file_padding:.1%} in file order"
            if file_padding is not None
            else "sorted and packed",
        ),
        (
            "batches",
            # pieces of one batch (committed by time, or across a resume) count once
            f"{len({(b.get('shard'), b.get('batch', i)) for i, b in enumerate(batches)}):,}"
            + (f" of {facts.batches_planned:,}" if facts.batches_planned else ""),
            f"{counted(sum(b.get('splits', 0) for b in batches), 'split')} (out of memory, or "
            "to find failing rows), "
            f"{counted(sum(b.get('failed_rows', 0) for b in batches), 'row')} failed in the model",
        ),
        ("task", str(s.get("task") or facts.spec.get("task", {}).get("type", "-")), ""),
        ("model", Path(_model(facts)).name or "-", _model(facts)),
        ("device", facts.device or "-", f"{len(facts.shards)} shards" if facts.sharded else ""),
    ]
    return cards


def _cards(facts: JobFacts) -> str:
    cells = [
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div>'
        f'<div class="n">{escape(n)}</div></div>'
        for k, v, n in key_figures(facts)
    ]
    return '<div class="cards">' + "".join(cells) + "</div>"


def _model(facts: JobFacts) -> str:
    return str(facts.spec.get("model", {}).get("path", ""))


def _wall_from_batches(facts: JobFacts) -> float | None:
    if not facts.has_timestamps:
        return None
    starts = [b["ended_at"] - b["seconds"] for b in facts.batches]
    return max(b["ended_at"] for b in facts.batches) - min(starts)


def _status_table(facts: JobFacts) -> str:
    order = {"ok": 0, "error": 1}
    rows = sorted(facts.rows_by_status.items(), key=lambda item: order.get(item[0], 2))
    if facts.rows_total is not None and facts.rows_done < facts.rows_total:
        rows.append(("not done yet", facts.rows_total - facts.rows_done))
    base = facts.rows_total or facts.rows_done
    cells = "".join(
        f"<tr><td>{escape(status)}</td><td class='num'>{count:,}</td>"
        f"<td class='num'>{_share(count, base)}</td></tr>"
        for status, count in rows
    )
    table = f"<table><tr><th>status</th><th>rows</th><th>share</th></tr>{cells}</table>"
    unread = (facts.plan or {}).get("row_errors") if facts.state != "done" else None
    if unread:
        table += (
            f'<p class="note">{counted(unread, "row")} could not run (found while reading the input); '
            "they join the outputs with their error when the job finishes.</p>"
        )
    return table


def _errors_table(facts: JobFacts) -> str:
    if not facts.errors:
        return '<p class="note">No row has an error.</p>'
    cells = "".join(
        f"<tr><td class='num'>{g.count:,}</td><td class='msg'>{escape(g.example)}</td></tr>"
        for g in facts.errors
    )
    return (
        "<h3>Most common errors</h3><p class='note'>Messages that differ only in their numbers "
        "are counted together; one example is shown.</p>"
        f"<table><tr><th>rows</th><th>error (example)</th></tr>{cells}</table>"
    )


def _padding_text(facts: JobFacts) -> str:
    sorted_padding, file_padding = padding_fractions(facts)
    if sorted_padding is None:
        return ""
    text = (
        f"Sorted by length and packed, {sorted_padding:.1%} of the padded prompt tokens are padding"
    )
    if file_padding is not None:
        text += f"; in file order it would have been {file_padding:.1%}"
    return f"<p>{escape(text)}.</p>"


def _shards_table(facts: JobFacts) -> str:
    cells = []
    for s in facts.shards:
        total = f"{s.rows_total:,}" if s.rows_total is not None else "?"
        colour = STATE_COLOURS.get(s.state, "#757575")
        cells.append(
            f"<tr><td>{escape(str(s.shard))}</td><td style='color:{colour}'>{escape(s.state)}</td>"
            f"<td class='num'>{s.rows_done:,} / {total}</td>"
            f"<td class='num'>{s.tokens_per_second:,.0f}</td>"
            f"<td class='msg'>{escape(s.error or '')}</td></tr>"
        )
    return (
        "<table><tr><th>shard</th><th>state</th><th>rows done</th><th>tokens/s</th>"
        f"<th>error</th></tr>{''.join(cells)}</table>"
    )


def _no_batch(facts: JobFacts) -> str:
    """Why a chart of batches is empty: none ran (a finished job whose rows all failed at
    read time), or none has finished yet."""
    return "no batch ran" if facts.state == "done" else "no batch has finished yet"


def _figure(figures: dict[str, tuple[str, str]], name: str, missing: str) -> str:
    if name not in figures:
        return f'<p class="note">{escape(missing)}</p>' if missing else ""
    markup, caption = figures[name]
    return f"<figure>{markup}<figcaption>{escape(caption)}</figcaption></figure>"


def _share(part: float, whole: float | None) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
